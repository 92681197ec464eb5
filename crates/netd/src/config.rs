//! sigil-netd's configuration: a TOML file, overridden by `SIGIL_NETD_<KEY>` environment variables,
//! overridden by flags (see [`sigil_daemon::Layers`]), validated once at start.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;
use sigil_daemon::CommonArgs;
use sigil_policy::{EnforcementMode, IpPrefix};
use sigil_spiffe::{SpiffeId, TrustDomain};

use crate::spiffe_id::{Deriver, SpiffeIdMode, check_cluster};

/// Default path of the API socket (0600; its directory is made 0755 and must be root's, see `api_listener`).
pub const DEFAULT_API_SOCKET: &str = "/run/sigil/netd.sock";
/// Default bpffs directory of the pinned maps and programs.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/sigil";
/// Default directory of the state file.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sigil/netd";
/// Default IPv4 pod CIDR.
pub const DEFAULT_POD_CIDR: &str = "10.200.0.0/24";
/// Default IPv6 pod CIDR.
pub const DEFAULT_POD_CIDR_V6: &str = "fd00:200::/64";
/// Default agent admin socket (the Delegated Identity API): the agent's default.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/sigil/agent/private/admin.sock";
/// Default wait for the agent before a pending endpoint falls back to its classic labels.
pub const DEFAULT_IDENTITY_FALLBACK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Where endpoint identities come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityMode {
    /// SPIFFE IDs from the agent's Delegated Identity API become a label of each endpoint.
    Spiffe,
    /// Labels only; no agent.
    Classic,
}

impl IdentityMode {
    fn parse(v: &str) -> Result<Self, &'static str> {
        match v {
            "spiffe" => Ok(Self::Spiffe),
            "classic" => Ok(Self::Classic),
            _ => Err("spiffe or classic"),
        }
    }
}

/// Flags of `sigil netd run`; each overrides the same key of the TOML file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// TOML configuration file (keys as the flags, with `_` for `-`).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Name of this node (default: the host name).
    #[arg(long)]
    pub node_name: Option<String>,
    /// IPv4 pod CIDR endpoints take addresses from.
    #[arg(long)]
    pub pod_cidr: Option<String>,
    /// IPv6 pod CIDR endpoints take addresses from.
    #[arg(long)]
    pub pod_cidr_v6: Option<String>,
    /// bpffs directory of the pinned maps and programs (bpffs is mounted if needed).
    #[arg(long)]
    pub bpf_pin_dir: Option<PathBuf>,
    /// Directory of policy YAML files, watched: a change re-imports the whole directory.
    #[arg(long)]
    pub policy_dir: Option<PathBuf>,
    /// Path of the API Unix socket (its directory is made 0700).
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// Directory of the state file (endpoints, addresses, identities, imported policies).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Policy enforcement: default, always or never.
    #[arg(long)]
    pub enforcement: Option<String>,
    /// Log options and drain bound, as every daemon has them.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Capacity of the kernel policy map when netd creates it (default 1048576; a map already
    /// pinned keeps its size).
    #[arg(long)]
    pub policy_map_max_entries: Option<u32>,
    // SPIFFE ID modes (see `spiffe_id` and `registrar`).
    /// Where endpoints' SPIFFE IDs come from: registered (default), istio, opaque or verbose.
    #[arg(long)]
    pub spiffe_id_mode: Option<String>,
    /// Path template of the verbose mode over {cluster}, {namespace}, {service_account}, {app}, {name}
    /// (default /cluster/{cluster}/ns/{namespace}/sa/{service_account}/app/{app}).
    #[arg(long)]
    pub spiffe_id_template: Option<String>,
    /// Trust domain of derived SPIFFE IDs (required in derived modes).
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Cluster name, `{cluster}` of the verbose template (default `default`).
    #[arg(long)]
    pub cluster_name: Option<String>,
    /// sigil-server's TLS address (HOST:PORT), where derived modes register entries.
    #[arg(long)]
    pub server_address: Option<String>,
    /// This node's agent's public Workload API socket, where netd fetches its own admin SVID.
    #[arg(long)]
    pub agent_workload_socket: Option<PathBuf>,
    /// SPIFFE ID of this node's agent: the parent of the entries netd registers (required in derived modes).
    #[arg(long)]
    pub agent_spiffe_id: Option<String>,
    /// How long a derived entry outlives the last endpoint with its identity on this node (default 30s).
    #[arg(long)]
    pub derived_entry_grace: Option<String>,
    /// Identity mode: spiffe (SPIFFE IDs from the agent) or classic (labels only). Default:
    /// spiffe when an agent socket is configured, else classic.
    #[arg(long)]
    pub identity_mode: Option<String>,
    /// The agent's admin socket (its Delegated Identity API).
    #[arg(long)]
    pub agent_socket: Option<PathBuf>,
    /// How long a new endpoint waits for its SVID before it falls back to its classic labels
    /// (e.g. 5s, 500ms).
    #[arg(long)]
    pub identity_fallback_wait: Option<String>,
    // Cluster mode (see `cluster`).
    /// The cluster's kvstore: `etcd` (without it netd is a single node).
    #[arg(long)]
    pub kvstore: Option<String>,
    /// etcd client URLs, comma-separated (`http://host:2379,...`).
    #[arg(long)]
    pub kvstore_endpoints: Option<String>,
    /// Cluster ID, 0..=255 (bits 16-23 of every identity this cluster allocates).
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// This node's underlay address (the one other nodes reach it on).
    #[arg(long)]
    pub node_ip: Option<String>,
    /// How traffic to other nodes' endpoints travels: vxlan (default) or disabled (routed to
    /// the node's underlay address).
    #[arg(long)]
    pub tunnel: Option<String>,
    /// A cluster range to lease this node's /24 pod CIDR from (instead of --pod-cidr).
    #[arg(long)]
    pub cluster_pod_cidr: Option<String>,
    /// Encryption between nodes: disabled (default) or spiffe (the VXLAN carrier sealed with
    /// keys agreed in a handshake authenticated by the nodes' SVIDs; needs --kvstore etcd,
    /// --tunnel vxlan and --agent-workload-socket, where netd gets its node SVID).
    #[arg(long)]
    pub encryption: Option<String>,
    /// Who builds the VXLAN packets of endpoints: bpf (default; the datapath encapsulates and
    /// decapsulates them itself on the underlay device, past the host's netfilter) or device
    /// (the kernel's VXLAN device, for every packet; always so with --encryption spiffe).
    #[arg(long)]
    pub tunnel_encap: Option<String>,
    /// TTL of this node's etcd lease: a silent node disappears after it (default 15s).
    #[arg(long)]
    pub kvstore_lease_ttl: Option<String>,
    /// How long an unused cluster identity is kept before it is collected (default 5m).
    #[arg(long)]
    pub identity_gc_grace: Option<String>,
    /// TCP port of the mutual-authentication handshake on --node-ip (default 4250, Cilium's).
    #[arg(long)]
    pub mutual_auth_port: Option<String>,
    // Hubble's Observer API (see `hubble`).
    /// Unix socket of the Hubble Observer API (0600; default `hubble.sock` beside the API socket).
    #[arg(long)]
    pub hubble_socket: Option<PathBuf>,
    /// Also serve the Hubble Observer API on this TCP address (plaintext, no authentication:
    /// loopback only unless `--hubble-listen-allow-remote`).
    #[arg(long)]
    pub hubble_listen_address: Option<String>,
    /// Allow a non-loopback `--hubble-listen-address` (anyone who reaches it reads every flow).
    #[arg(long)]
    pub hubble_listen_allow_remote: Option<bool>,
    /// Capacity of the flow ring buffer (default 4095, as Hubble's).
    #[arg(long)]
    pub hubble_max_flows: Option<usize>,
    /// Most follow streams (`GetFlows` with follow) open at once; more are refused (default 64).
    #[arg(long)]
    pub hubble_max_follow_streams: Option<usize>,
    /// Serve the live service map on this TCP address (plaintext, no authentication: loopback
    /// only unless `--ui-allow-remote`; default off).
    #[arg(long)]
    pub ui_address: Option<String>,
    /// Allow a non-loopback `--ui-address` (anyone who reaches it sees every flow).
    #[arg(long)]
    pub ui_allow_remote: Option<bool>,
    /// Export flows as JSON lines to this file (Hubble's exporter; created 0600, its directory
    /// writable only by its owner).
    #[arg(long)]
    pub hubble_export_file_path: Option<PathBuf>,
    /// Rotate the export file past this size in MB (default 10; fractions allowed).
    #[arg(long)]
    pub hubble_export_file_max_size_mb: Option<f64>,
    /// Rotated export files kept (default 5).
    #[arg(long)]
    pub hubble_export_file_max_backups: Option<u32>,
    /// Export only flows matching one of these Hubble FlowFilters (JSON objects or an array).
    #[arg(long)]
    pub hubble_export_allowlist: Option<String>,
    /// Do not export flows matching one of these Hubble FlowFilters (JSON objects or an array).
    #[arg(long)]
    pub hubble_export_denylist: Option<String>,
    /// Events waiting for the export writer; more are dropped and counted (default 65536).
    #[arg(long)]
    pub hubble_export_queue_size: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_name: Option<String>,
    pod_cidr: Option<String>,
    pod_cidr_v6: Option<String>,
    bpf_pin_dir: Option<PathBuf>,
    policy_dir: Option<PathBuf>,
    api_socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    enforcement: Option<String>,
    log_level: Option<String>,
    log_format: Option<String>,
    drain_timeout: Option<String>,
    metrics_address: Option<String>,
    policy_map_max_entries: Option<u32>,
    spiffe_id_mode: Option<String>,
    spiffe_id_template: Option<String>,
    trust_domain: Option<String>,
    cluster_name: Option<String>,
    server_address: Option<String>,
    agent_workload_socket: Option<PathBuf>,
    agent_spiffe_id: Option<String>,
    derived_entry_grace: Option<String>,
    identity_mode: Option<String>,
    agent_socket: Option<PathBuf>,
    identity_fallback_wait: Option<String>,
    kvstore: Option<String>,
    kvstore_endpoints: Option<String>,
    cluster_id: Option<String>,
    node_ip: Option<String>,
    tunnel: Option<String>,
    cluster_pod_cidr: Option<String>,
    encryption: Option<String>,
    tunnel_encap: Option<String>,
    kvstore_lease_ttl: Option<String>,
    identity_gc_grace: Option<String>,
    mutual_auth_port: Option<String>,
    hubble_socket: Option<PathBuf>,
    hubble_listen_address: Option<String>,
    hubble_listen_allow_remote: Option<bool>,
    hubble_max_flows: Option<usize>,
    hubble_max_follow_streams: Option<usize>,
    ui_address: Option<String>,
    ui_allow_remote: Option<bool>,
    hubble_export_file_path: Option<PathBuf>,
    hubble_export_file_max_size_mb: Option<f64>,
    hubble_export_file_max_backups: Option<u32>,
    hubble_export_allowlist: Option<String>,
    hubble_export_denylist: Option<String>,
    hubble_export_queue_size: Option<usize>,
}

/// How traffic to other nodes' endpoints travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tunnel {
    /// Encapsulated in VXLAN to the hosting node.
    Vxlan,
    /// Routed to the hosting node's underlay address (direct routing).
    Disabled,
}

/// Whether traffic between nodes is encrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encryption {
    /// The VXLAN carrier travels in the clear.
    Disabled,
    /// The encrypted carrier (`sigil-encryption`), keyed with the node SVID this node's
    /// agent serves netd on its Workload API at `workload_socket`.
    Spiffe {
        /// The agent's public Workload API socket.
        workload_socket: PathBuf,
    },
}

/// Default TTL of a node's etcd lease.
pub const DEFAULT_KVSTORE_LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(15);
/// Default grace before an unused cluster identity is collected.
pub const DEFAULT_IDENTITY_GC_GRACE: std::time::Duration = std::time::Duration::from_secs(300);
/// Prefix length of a pod CIDR leased from `--cluster-pod-cidr`.
pub const LEASED_POD_CIDR_LEN: u8 = 24;

/// Cluster mode: where etcd is and who this node is in it.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// etcd client URLs.
    pub endpoints: Vec<String>,
    /// Cluster name (keys under `sigil/<name>/`).
    pub cluster_name: String,
    /// Cluster ID.
    pub cluster_id: u8,
    /// This node's underlay address.
    pub node_ip: IpAddr,
    /// The carrier between nodes.
    pub tunnel: Tunnel,
    /// Encryption of the carrier.
    pub encryption: Encryption,
    /// Whether the datapath builds and takes apart the VXLAN packets itself on the underlay
    /// device (`tunnel_encap bpf`, the default without encryption) rather than the VXLAN
    /// device doing it for every packet.
    pub bpf_encap: bool,
    /// The range to lease this node's pod CIDR from (`None`: `pod_cidr` is claimed as is).
    pub cluster_pod_cidr: Option<PodCidr<Ipv4Addr>>,
    /// TTL of this node's lease.
    pub lease_ttl: std::time::Duration,
    /// Grace before an unused identity is collected.
    pub gc_grace: std::time::Duration,
    /// TCP port of the mutual-authentication handshake (on `node_ip`).
    pub mutual_auth_port: u16,
}

impl ClusterConfig {
    /// The kvstore's config for this node (`resume_lease`: the lease of a previous run).
    pub fn kvstore(&self, node_name: &str, resume_lease: Option<i64>) -> sigil_kvstore::Config {
        let mut c = sigil_kvstore::Config::new(
            self.endpoints.clone(),
            &self.cluster_name,
            self.cluster_id,
            node_name,
            self.node_ip,
        );
        c.lease_ttl = self.lease_ttl;
        c.request_timeout = std::time::Duration::from_secs(2);
        c.resume_lease = resume_lease;
        c
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Node name.
    pub node_name: String,
    /// IPv4 pod CIDR.
    pub pod_cidr: PodCidr<Ipv4Addr>,
    /// IPv6 pod CIDR.
    pub pod_cidr_v6: PodCidr<Ipv6Addr>,
    /// Pin directory.
    pub bpf_pin_dir: PathBuf,
    /// Watched policy directory.
    pub policy_dir: Option<PathBuf>,
    /// API socket.
    pub api_socket: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// Enforcement mode.
    pub enforcement: EnforcementMode,
    /// Log level.
    pub log_level: String,
    /// Log format.
    pub log_format: sigil_daemon::LogFormat,
    /// Bound on finishing in-flight API calls after SIGTERM.
    pub drain_timeout: std::time::Duration,
    /// Where Prometheus metrics are served (`None`: not served).
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Policy map capacity when it is created (`None`: the object's 1 048 576).
    pub policy_map_max_entries: Option<u32>,
    /// SPIFFE ID mode, and in derived modes what the registrar needs.
    pub spiffe_ids: SpiffeIdConfig,
    /// Identity mode.
    pub identity_mode: IdentityMode,
    /// The agent's admin socket (used in spiffe mode).
    pub agent_socket: PathBuf,
    /// Wait before a pending endpoint falls back to its classic labels.
    pub identity_fallback_wait: std::time::Duration,
    /// Cluster mode (`--kvstore`); `None`: a single node.
    pub cluster: Option<ClusterConfig>,
    /// Hubble's Observer API.
    pub hubble: HubbleConfig,
    /// The live service map (`None`: off).
    pub ui: Option<crate::ui::UiConfig>,
}

/// Where and how the Hubble Observer API is served.
#[derive(Debug, Clone)]
pub struct HubbleConfig {
    /// Its Unix socket (0600).
    pub socket: PathBuf,
    /// An optional TCP address (loopback unless allowed).
    pub listen_address: Option<std::net::SocketAddr>,
    /// Flow ring capacity.
    pub max_flows: usize,
    /// Follow streams open at once.
    pub max_follow_streams: usize,
    /// The flow exporter, if configured.
    pub export: Option<crate::hubble::export::ExportConfig>,
}

/// Where endpoints' SPIFFE IDs come from.
#[derive(Debug, Clone)]
pub struct SpiffeIdConfig {
    /// The mode (`registered` unless configured).
    pub mode: SpiffeIdMode,
    /// In derived modes: the deriver and where to register entries.
    pub registrar: Option<RegistrarConfig>,
}

/// What the registrar of derived entries needs.
#[derive(Debug, Clone)]
pub struct RegistrarConfig {
    /// Derives IDs and selectors.
    pub deriver: Deriver,
    /// sigil-server's TLS address.
    pub server_address: String,
    /// The agent's public Workload API socket.
    pub agent_workload_socket: PathBuf,
    /// This node's agent's SPIFFE ID: the parent of every entry netd registers.
    pub agent_spiffe_id: SpiffeId,
    /// How long an entry outlives the last endpoint with its identity.
    pub grace: std::time::Duration,
}

/// Default public Workload API socket of the agent.
pub const DEFAULT_AGENT_WORKLOAD_SOCKET: &str = "/run/sigil/agent/public/api.sock";
/// Default grace before a derived entry without endpoints is deleted.
pub const DEFAULT_DERIVED_ENTRY_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// A pod CIDR of one family: network address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodCidr<A> {
    /// Network address (host bits clear).
    pub network: A,
    /// Prefix length.
    pub prefix_len: u8,
}

impl<A: Copy + Into<IpAddr>> PodCidr<A> {
    /// As a policy-crate prefix.
    pub fn prefix(&self) -> Option<IpPrefix> {
        IpPrefix::new(self.network.into(), self.prefix_len)
    }
}

impl<A: std::fmt::Display> std::fmt::Display for PodCidr<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl PodCidr<Ipv4Addr> {
    /// Host `index` of the CIDR (0 is the network address), if inside it and not broadcast.
    pub fn host(&self, index: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.prefix_len));
        if u64::from(index) + 1 >= size {
            return None;
        }
        Some(Ipv4Addr::from(u32::from(self.network) + index))
    }

    /// Parses `a.b.c.d/len` (prefix 8..=30), refusing host bits.
    pub fn parse(field: &str, s: &str) -> anyhow::Result<Self> {
        let (addr, len) = split_cidr(field, s)?;
        let IpAddr::V4(a) = addr else {
            bail!("{field}: invalid value {s:?}: not an IPv4 CIDR");
        };
        if !(8..=30).contains(&len) {
            bail!("{field}: invalid value {s:?}: the prefix length must be 8..=30");
        }
        let mask = u32::MAX << (32 - u32::from(len));
        if u32::from(a) & !mask != 0 {
            bail!("{field}: invalid value {s:?}: host bits are set");
        }
        Ok(Self {
            network: a,
            prefix_len: len,
        })
    }
}

impl PodCidr<Ipv6Addr> {
    /// Host `index` of the CIDR, if inside it.
    pub fn host(&self, index: u32) -> Option<Ipv6Addr> {
        let bits = 128 - u32::from(self.prefix_len);
        if bits < 32 && u64::from(index) >= (1u64 << bits) {
            return None;
        }
        Some(Ipv6Addr::from(u128::from(self.network) + u128::from(index)))
    }

    /// Parses `x::/len` (prefix 64..=120), refusing host bits.
    pub fn parse(field: &str, s: &str) -> anyhow::Result<Self> {
        let (addr, len) = split_cidr(field, s)?;
        let IpAddr::V6(a) = addr else {
            bail!("{field}: invalid value {s:?}: not an IPv6 CIDR");
        };
        if !(64..=120).contains(&len) {
            bail!("{field}: invalid value {s:?}: the prefix length must be 64..=120");
        }
        let mask = u128::MAX << (128 - u32::from(len));
        if u128::from(a) & !mask != 0 {
            bail!("{field}: invalid value {s:?}: host bits are set");
        }
        Ok(Self {
            network: a,
            prefix_len: len,
        })
    }
}

fn split_cidr(field: &str, s: &str) -> anyhow::Result<(IpAddr, u8)> {
    let (a, l) = s
        .split_once('/')
        .with_context(|| format!("{field}: invalid value {s:?}: want ADDRESS/LENGTH"))?;
    let addr: IpAddr = a
        .parse()
        .with_context(|| format!("{field}: invalid value {s:?}: {a:?} is not an IP address"))?;
    let len: u8 = l
        .parse()
        .with_context(|| format!("{field}: invalid value {s:?}: {l:?} is not a prefix length"))?;
    Ok((addr, len))
}

impl Config {
    /// Merges the file named by `--config` (if any) with the flags and validates the result.
    pub fn from_args(args: &RunArgs) -> anyhow::Result<Self> {
        Self::from_layers(args, |path| sigil_daemon::Layers::new("netd", path))
    }

    /// As [`Config::from_args`], with the environment layer built by `layers` (tests give their own).
    pub fn from_layers(
        args: &RunArgs,
        layers: impl FnOnce(Option<&Path>) -> sigil_daemon::Layers,
    ) -> anyhow::Result<Self> {
        let l = layers(args.config.as_deref());
        let mut file: FileConfig = l.read_file()?;
        let hubble_file = HubbleFile {
            hubble_socket: file.hubble_socket.take(),
            hubble_listen_address: file.hubble_listen_address.take(),
            hubble_listen_allow_remote: file.hubble_listen_allow_remote.take(),
            hubble_max_flows: file.hubble_max_flows.take(),
            hubble_max_follow_streams: file.hubble_max_follow_streams.take(),
            hubble_export_file_path: file.hubble_export_file_path.take(),
            hubble_export_file_max_size_mb: file.hubble_export_file_max_size_mb.take(),
            hubble_export_file_max_backups: file.hubble_export_file_max_backups.take(),
            hubble_export_allowlist: file.hubble_export_allowlist.take(),
            hubble_export_denylist: file.hubble_export_denylist.take(),
            hubble_export_queue_size: file.hubble_export_queue_size.take(),
        };
        let ui = crate::ui::config(
            &l,
            (args.ui_address.clone(), file.ui_address.take()),
            (args.ui_allow_remote, file.ui_allow_remote.take()),
        )?;
        let spiffe_ids = spiffe_id_config(&l, args, &file)?;
        let node_name = l
            .get("node_name", args.node_name.clone(), file.node_name.clone())?
            .unwrap_or_else(hostname);
        if node_name.is_empty() {
            bail!("node_name: invalid value \"\": must not be empty");
        }
        let cluster = cluster_config(&l, args, &file, &node_name, &spiffe_ids)?;
        if let Some(c) = &cluster
            && let Some(range) = c.cluster_pod_cidr
            && l.raw("pod_cidr", args.pod_cidr.clone(), file.pod_cidr.clone())
                .is_some()
        {
            bail!(
                "cluster_pod_cidr: invalid value \"{range}\": set together with pod_cidr; give one of them"
            );
        }
        let pod_cidr = l
            .parse("pod_cidr", args.pod_cidr.clone(), file.pod_cidr, |v| {
                PodCidr::<Ipv4Addr>::parse("pod_cidr", v).map_err(|e| reason("pod_cidr", v, e))
            })?
            .map_or_else(
                || PodCidr::<Ipv4Addr>::parse("pod_cidr", DEFAULT_POD_CIDR),
                Ok,
            )?;
        let pod_cidr_v6 = l
            .parse(
                "pod_cidr_v6",
                args.pod_cidr_v6.clone(),
                file.pod_cidr_v6,
                |v| {
                    PodCidr::<Ipv6Addr>::parse("pod_cidr_v6", v)
                        .map_err(|e| reason("pod_cidr_v6", v, e))
                },
            )?
            .map_or_else(
                || PodCidr::<Ipv6Addr>::parse("pod_cidr_v6", DEFAULT_POD_CIDR_V6),
                Ok,
            )?;
        let api_socket = l
            .get("api_socket", args.api_socket.clone(), file.api_socket)?
            .unwrap_or_else(|| PathBuf::from(DEFAULT_API_SOCKET));
        if api_socket.parent().is_none_or(|p| p.as_os_str().is_empty()) {
            bail!(
                "api_socket: {} has no parent directory",
                api_socket.display()
            );
        }
        let enforcement = l
            .parse(
                "enforcement",
                args.enforcement.clone(),
                file.enforcement,
                |v| EnforcementMode::parse(v).ok_or("default, always or never"),
            )?
            .unwrap_or(EnforcementMode::Default);
        let policy_map_max_entries = l.get(
            "policy_map_max_entries",
            args.policy_map_max_entries,
            file.policy_map_max_entries,
        )?;
        if policy_map_max_entries == Some(0) {
            bail!("policy_map_max_entries: invalid value 0: must be at least 1");
        }
        let common = l.common(
            &args.common,
            CommonArgs::new(file.log_level, file.log_format, file.drain_timeout)
                .with_metrics_address(file.metrics_address),
        )?;
        let agent_socket = l.get("agent_socket", args.agent_socket.clone(), file.agent_socket)?;
        let identity_mode = l
            .parse(
                "identity_mode",
                args.identity_mode.clone(),
                file.identity_mode,
                IdentityMode::parse,
            )?
            .unwrap_or(if agent_socket.is_some() {
                IdentityMode::Spiffe
            } else {
                IdentityMode::Classic
            });
        let agent_socket = agent_socket.unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET));
        if agent_socket.as_os_str().is_empty() {
            bail!("agent_socket: invalid value \"\": must be a socket path");
        }
        let identity_fallback_wait = l
            .parse(
                "identity_fallback_wait",
                args.identity_fallback_wait.clone(),
                file.identity_fallback_wait,
                sigil_daemon::runtime::parse_drain_timeout,
            )?
            .unwrap_or(DEFAULT_IDENTITY_FALLBACK_WAIT);
        let hubble = hubble_config(&l, args, hubble_file, &api_socket)?;
        Ok(Self {
            cluster,
            hubble,
            ui,
            spiffe_ids,
            identity_mode,
            agent_socket,
            identity_fallback_wait,
            policy_map_max_entries,
            node_name,
            pod_cidr,
            pod_cidr_v6,
            bpf_pin_dir: l
                .get("bpf_pin_dir", args.bpf_pin_dir.clone(), file.bpf_pin_dir)?
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR)),
            policy_dir: l.get("policy_dir", args.policy_dir.clone(), file.policy_dir)?,
            api_socket,
            state_dir: l
                .get("state_dir", args.state_dir.clone(), file.state_dir)?
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            enforcement,
            log_level: common.log_level,
            log_format: common.log_format,
            drain_timeout: common.drain_timeout,
            metrics_address: common.metrics_address,
        })
    }
}

/// The Hubble keys of the file, taken out before the other keys are consumed.
struct HubbleFile {
    hubble_socket: Option<PathBuf>,
    hubble_listen_address: Option<String>,
    hubble_listen_allow_remote: Option<bool>,
    hubble_max_flows: Option<usize>,
    hubble_max_follow_streams: Option<usize>,
    hubble_export_file_path: Option<PathBuf>,
    hubble_export_file_max_size_mb: Option<f64>,
    hubble_export_file_max_backups: Option<u32>,
    hubble_export_allowlist: Option<String>,
    hubble_export_denylist: Option<String>,
    hubble_export_queue_size: Option<usize>,
}

/// The Hubble settings, each checked by name and value.
fn hubble_config(
    l: &sigil_daemon::Layers,
    args: &RunArgs,
    file: HubbleFile,
    api_socket: &Path,
) -> anyhow::Result<HubbleConfig> {
    let export = export_config(
        l,
        args,
        ExportFile {
            path: file.hubble_export_file_path,
            max_size_mb: file.hubble_export_file_max_size_mb,
            max_backups: file.hubble_export_file_max_backups,
            allowlist: file.hubble_export_allowlist,
            denylist: file.hubble_export_denylist,
            queue_size: file.hubble_export_queue_size,
        },
    )?;
    let socket = l
        .get(
            "hubble_socket",
            args.hubble_socket.clone(),
            file.hubble_socket,
        )?
        .unwrap_or_else(|| {
            api_socket
                .parent()
                .unwrap_or(Path::new("/"))
                .join(crate::hubble::DEFAULT_SOCKET_NAME)
        });
    if socket.parent().is_none_or(|p| p.as_os_str().is_empty()) || socket == api_socket {
        bail!(
            "hubble_socket: invalid value {:?}: must be a socket path with a directory, not the API socket",
            socket.display().to_string()
        );
    }
    let allow_remote = l
        .get(
            "hubble_listen_allow_remote",
            args.hubble_listen_allow_remote,
            file.hubble_listen_allow_remote,
        )?
        .unwrap_or(false);
    let listen_address = l.parse(
        "hubble_listen_address",
        args.hubble_listen_address.clone(),
        file.hubble_listen_address,
        |v| match v.parse::<std::net::SocketAddr>() {
            Err(_) => Err("want IP:PORT (e.g. 127.0.0.1:4244)"),
            Ok(a) if !a.ip().is_loopback() && !allow_remote => Err(
                "not a loopback address: the Hubble API is plaintext without authentication; set hubble_listen_allow_remote to serve it beyond this host",
            ),
            Ok(a) => Ok(a),
        },
    )?;
    let max_flows = l
        .get(
            "hubble_max_flows",
            args.hubble_max_flows,
            file.hubble_max_flows,
        )?
        .unwrap_or(crate::hubble::DEFAULT_MAX_FLOWS);
    if !(1..=crate::hubble::MAX_MAX_FLOWS).contains(&max_flows) {
        bail!(
            "hubble_max_flows: invalid value {max_flows}: must be 1..={}",
            crate::hubble::MAX_MAX_FLOWS
        );
    }
    let max_follow_streams = l
        .get(
            "hubble_max_follow_streams",
            args.hubble_max_follow_streams,
            file.hubble_max_follow_streams,
        )?
        .unwrap_or(crate::hubble::DEFAULT_MAX_FOLLOW_STREAMS);
    if !(1..=65_536).contains(&max_follow_streams) {
        bail!("hubble_max_follow_streams: invalid value {max_follow_streams}: must be 1..=65536");
    }
    Ok(HubbleConfig {
        socket,
        listen_address,
        max_flows,
        max_follow_streams,
        export,
    })
}

/// The exporter keys of the file.
struct ExportFile {
    path: Option<PathBuf>,
    max_size_mb: Option<f64>,
    max_backups: Option<u32>,
    allowlist: Option<String>,
    denylist: Option<String>,
    queue_size: Option<usize>,
}

/// The flow exporter's settings, each checked by name and value; `None` without a path.
fn export_config(
    l: &sigil_daemon::Layers,
    args: &RunArgs,
    file: ExportFile,
) -> anyhow::Result<Option<crate::hubble::export::ExportConfig>> {
    use crate::hubble::export;
    let path = l.get(
        "hubble_export_file_path",
        args.hubble_export_file_path.clone(),
        file.path,
    )?;
    let max_mb = l
        .get(
            "hubble_export_file_max_size_mb",
            args.hubble_export_file_max_size_mb,
            file.max_size_mb,
        )?
        .unwrap_or(export::DEFAULT_MAX_SIZE_MB);
    if !(max_mb.is_finite() && max_mb > 0.0 && max_mb <= 1_048_576.0) {
        bail!(
            "hubble_export_file_max_size_mb: invalid value {max_mb}: must be > 0 and at most 1048576"
        );
    }
    let max_backups = l
        .get(
            "hubble_export_file_max_backups",
            args.hubble_export_file_max_backups,
            file.max_backups,
        )?
        .unwrap_or(export::DEFAULT_MAX_BACKUPS);
    if max_backups > 1000 {
        bail!("hubble_export_file_max_backups: invalid value {max_backups}: must be at most 1000");
    }
    let queue = l
        .get(
            "hubble_export_queue_size",
            args.hubble_export_queue_size,
            file.queue_size,
        )?
        .unwrap_or(export::DEFAULT_QUEUE);
    if !(1..=16_777_216).contains(&queue) {
        bail!("hubble_export_queue_size: invalid value {queue}: must be 1..=16777216");
    }
    let list = |key: &str, flag: Option<String>, file: Option<String>| {
        l.parse(key, flag, file, |v| export::parse_filter_list(key, v))
            .map(Option::unwrap_or_default)
    };
    let allowlist = list(
        "hubble_export_allowlist",
        args.hubble_export_allowlist.clone(),
        file.allowlist,
    )?;
    let denylist = list(
        "hubble_export_denylist",
        args.hubble_export_denylist.clone(),
        file.denylist,
    )?;
    // Hubble's filter rules (CIDRs, selectors, ...) checked now, not at the first flow.
    crate::hubble::filter::Filters::new(&allowlist, &denylist).map_err(|e| {
        anyhow::anyhow!(
            "hubble_export_allowlist/denylist: {}",
            e.to_string()
                .replace("whitelist", "allowlist")
                .replace("blacklist", "denylist")
        )
    })?;
    let Some(path) = path else {
        if !allowlist.is_empty() || !denylist.is_empty() {
            bail!("hubble_export_allowlist/denylist: set, but hubble_export_file_path is not");
        }
        return Ok(None);
    };
    if !path.is_absolute() {
        bail!(
            "hubble_export_file_path: invalid value {:?}: must be an absolute path",
            path.display().to_string()
        );
    }
    Ok(Some(export::ExportConfig {
        path,
        max_size_bytes: (max_mb * 1_048_576.0) as u64,
        max_backups,
        allowlist,
        denylist,
        queue,
    }))
}

/// The SPIFFE ID mode and, in derived modes, the registrar's settings, each checked by name and value.
fn spiffe_id_config(
    l: &sigil_daemon::Layers,
    args: &RunArgs,
    file: &FileConfig,
) -> anyhow::Result<SpiffeIdConfig> {
    let mode = l
        .get(
            "spiffe_id_mode",
            args.spiffe_id_mode.clone(),
            file.spiffe_id_mode.clone(),
        )?
        .unwrap_or_else(|| "registered".to_owned());
    let template = l.get(
        "spiffe_id_template",
        args.spiffe_id_template.clone(),
        file.spiffe_id_template.clone(),
    )?;
    let mode = SpiffeIdMode::parse(&mode, template.as_deref())?;
    let trust_domain = l.parse(
        "trust_domain",
        args.trust_domain.clone(),
        file.trust_domain.clone(),
        TrustDomain::parse,
    )?;
    let cluster = l
        .get(
            "cluster_name",
            args.cluster_name.clone(),
            file.cluster_name.clone(),
        )?
        .unwrap_or_else(|| crate::spiffe_id::DEFAULT_CLUSTER.to_owned());
    check_cluster(&cluster)?;
    let server_address = l.parse(
        "server_address",
        args.server_address.clone(),
        file.server_address.clone(),
        |v| match v.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {
                Ok(v.to_owned())
            }
            _ => Err("want HOST:PORT"),
        },
    )?;
    let agent_spiffe_id = l.parse(
        "agent_spiffe_id",
        args.agent_spiffe_id.clone(),
        file.agent_spiffe_id.clone(),
        SpiffeId::parse,
    )?;
    let agent_workload_socket = l
        .get(
            "agent_workload_socket",
            args.agent_workload_socket.clone(),
            file.agent_workload_socket.clone(),
        )?
        .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_WORKLOAD_SOCKET));
    if !agent_workload_socket.is_absolute() {
        bail!(
            "agent_workload_socket: invalid value {:?}: must be an absolute path",
            agent_workload_socket.display().to_string()
        );
    }
    let grace = l
        .parse(
            "derived_entry_grace",
            args.derived_entry_grace.clone(),
            file.derived_entry_grace.clone(),
            sigil_daemon::runtime::parse_drain_timeout,
        )?
        .unwrap_or(DEFAULT_DERIVED_ENTRY_GRACE);
    if !mode.is_derived() {
        return Ok(SpiffeIdConfig {
            mode,
            registrar: None,
        });
    }
    let need = |key: &str| {
        anyhow::anyhow!(
            "{key}: required with spiffe_id_mode {} (netd registers the derived entries itself)",
            mode.name()
        )
    };
    let trust_domain = trust_domain.ok_or_else(|| need("trust_domain"))?;
    let agent_spiffe_id = agent_spiffe_id.ok_or_else(|| need("agent_spiffe_id"))?;
    if agent_spiffe_id.trust_domain() != trust_domain {
        bail!(
            "agent_spiffe_id: invalid value {:?}: not in trust_domain {trust_domain}",
            agent_spiffe_id.to_string()
        );
    }
    let server_address = server_address.ok_or_else(|| need("server_address"))?;
    Ok(SpiffeIdConfig {
        registrar: Some(RegistrarConfig {
            deriver: Deriver {
                mode: mode.clone(),
                trust_domain,
                cluster,
            },
            server_address,
            agent_workload_socket,
            agent_spiffe_id,
            grace,
        }),
        mode,
    })
}

/// Cluster mode's settings, each checked by name and value; `None` without `kvstore`, where
/// setting any of them is an error.
fn cluster_config(
    l: &sigil_daemon::Layers,
    args: &RunArgs,
    file: &FileConfig,
    node_name: &str,
    spiffe_ids: &SpiffeIdConfig,
) -> anyhow::Result<Option<ClusterConfig>> {
    let kvstore = l.parse(
        "kvstore",
        args.kvstore.clone(),
        file.kvstore.clone(),
        |v| match v {
            "etcd" => Ok(()),
            _ => Err("the only kvstore is etcd"),
        },
    )?;
    let endpoints = l.parse(
        "kvstore_endpoints",
        args.kvstore_endpoints.clone(),
        file.kvstore_endpoints.clone(),
        |v| {
            let list: Vec<String> = v.split(',').map(|e| e.trim().to_owned()).collect();
            for e in &list {
                let rest = e
                    .strip_prefix("http://")
                    .ok_or_else(|| format!("{e:?} does not start with http://"))?;
                let (host, port) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| format!("{e:?} is not http://HOST:PORT"))?;
                if host.is_empty() || port.parse::<u16>().is_err() || port == "0" {
                    return Err(format!("{e:?} is not http://HOST:PORT"));
                }
            }
            Ok(list)
        },
    )?;
    let cluster_id = l.parse(
        "cluster_id",
        args.cluster_id.clone(),
        file.cluster_id.clone(),
        |v| v.parse::<u8>().map_err(|_| "must be an integer 0..=255"),
    )?;
    let node_ip = l.parse(
        "node_ip",
        args.node_ip.clone(),
        file.node_ip.clone(),
        |v| match v.parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() => {
                Err("must be a unicast, non-loopback address")
            }
            Ok(ip) => Ok(ip),
            Err(_) => Err("not an IP address"),
        },
    )?;
    let tunnel = l.parse(
        "tunnel",
        args.tunnel.clone(),
        file.tunnel.clone(),
        |v| match v {
            "vxlan" => Ok(Tunnel::Vxlan),
            "disabled" => Ok(Tunnel::Disabled),
            _ => Err("vxlan or disabled"),
        },
    )?;
    let cluster_pod_cidr = l.parse(
        "cluster_pod_cidr",
        args.cluster_pod_cidr.clone(),
        file.cluster_pod_cidr.clone(),
        |v| {
            let c = PodCidr::<Ipv4Addr>::parse("cluster_pod_cidr", v)
                .map_err(|e| reason("cluster_pod_cidr", v, e))?;
            if c.prefix_len > LEASED_POD_CIDR_LEN {
                return Err(format!(
                    "must be /{LEASED_POD_CIDR_LEN} or larger: nodes lease /{LEASED_POD_CIDR_LEN}s from it"
                ));
            }
            Ok(c)
        },
    )?;
    let encryption = l.parse(
        "encryption",
        args.encryption.clone(),
        file.encryption.clone(),
        |v| match v {
            "spiffe" => Ok(true),
            "disabled" => Ok(false),
            _ => Err("spiffe or disabled"),
        },
    )?;
    let tunnel_encap = l.parse(
        "tunnel_encap",
        args.tunnel_encap.clone(),
        file.tunnel_encap.clone(),
        |v| match v {
            "bpf" => Ok(true),
            "device" => Ok(false),
            _ => Err("bpf or device"),
        },
    )?;
    let lease_ttl = l.parse(
        "kvstore_lease_ttl",
        args.kvstore_lease_ttl.clone(),
        file.kvstore_lease_ttl.clone(),
        |v| match sigil_daemon::runtime::parse_drain_timeout(v) {
            Ok(d)
                if d >= std::time::Duration::from_secs(2)
                    && d <= std::time::Duration::from_secs(3600)
                    && d.subsec_nanos() == 0 =>
            {
                Ok(d)
            }
            Ok(_) => Err("must be whole seconds, 2s to 1h".to_owned()),
            Err(e) => Err(e.to_string()),
        },
    )?;
    let gc_grace = l.parse(
        "identity_gc_grace",
        args.identity_gc_grace.clone(),
        file.identity_gc_grace.clone(),
        sigil_daemon::runtime::parse_drain_timeout,
    )?;
    let mutual_auth_port = l.parse(
        "mutual_auth_port",
        args.mutual_auth_port.clone(),
        file.mutual_auth_port.clone(),
        |v| match v.parse::<u16>() {
            Ok(0) | Err(_) => Err("must be a TCP port, 1..=65535"),
            Ok(p) => Ok(p),
        },
    )?;
    let cluster_name = l.get(
        "cluster_name",
        args.cluster_name.clone(),
        file.cluster_name.clone(),
    )?;
    if kvstore.is_none() {
        let set = [
            ("kvstore_endpoints", endpoints.is_some()),
            ("cluster_id", cluster_id.is_some()),
            ("node_ip", node_ip.is_some()),
            ("tunnel", tunnel.is_some()),
            ("cluster_pod_cidr", cluster_pod_cidr.is_some()),
            ("encryption", encryption == Some(true)),
            ("tunnel_encap", tunnel_encap.is_some()),
            ("kvstore_lease_ttl", lease_ttl.is_some()),
            ("identity_gc_grace", gc_grace.is_some()),
            ("mutual_auth_port", mutual_auth_port.is_some()),
        ];
        if let Some((key, _)) = set.iter().find(|(_, s)| *s) {
            bail!("{key}: set without kvstore; cluster settings need --kvstore etcd");
        }
        return Ok(None);
    }
    let endpoints = endpoints
        .ok_or_else(|| anyhow::anyhow!("kvstore_endpoints: required with kvstore etcd"))?;
    let node_ip = node_ip.ok_or_else(|| {
        anyhow::anyhow!("node_ip: required with kvstore etcd (this node's underlay address)")
    })?;
    if spiffe_ids.mode == SpiffeIdMode::Opaque {
        bail!(
            "spiffe_id_mode: invalid value \"opaque\": not supported with kvstore etcd (an opaque \
             ID names a number; use istio, verbose or registered in a cluster)"
        );
    }
    let cluster_name = cluster_name.unwrap_or_else(|| crate::spiffe_id::DEFAULT_CLUSTER.to_owned());
    let tunnel = tunnel.unwrap_or(Tunnel::Vxlan);
    let encryption = match encryption {
        Some(true) => {
            if tunnel != Tunnel::Vxlan {
                bail!(
                    "encryption: invalid value \"spiffe\": needs tunnel vxlan (the encrypted \
                     carrier seals the VXLAN packets), not tunnel disabled"
                );
            }
            // The node SVID's source must be named: the default path is a guess, and a node
            // that cannot key its sessions would send nothing (fail closed) rather than fall back.
            let Some((socket, _)) = l.raw(
                "agent_workload_socket",
                args.agent_workload_socket
                    .as_ref()
                    .map(|p| p.display().to_string()),
                file.agent_workload_socket
                    .as_ref()
                    .map(|p| p.display().to_string()),
            ) else {
                bail!(
                    "encryption: invalid value \"spiffe\": needs agent_workload_socket (the \
                     agent's Workload API, where netd gets its node SVID)"
                );
            };
            let workload_socket = PathBuf::from(socket);
            if !workload_socket.is_absolute() {
                bail!(
                    "agent_workload_socket: invalid value {:?}: must be an absolute path",
                    workload_socket.display().to_string()
                );
            }
            Encryption::Spiffe { workload_socket }
        }
        _ => Encryption::Disabled,
    };
    if tunnel_encap.is_some() && tunnel != Tunnel::Vxlan {
        bail!("tunnel_encap: set with tunnel disabled; it chooses how VXLAN packets are built");
    }
    if tunnel_encap == Some(true) && encryption != Encryption::Disabled {
        bail!(
            "tunnel_encap: invalid value \"bpf\": not with encryption spiffe (the encrypted carrier \
             takes the VXLAN packets from the VXLAN device through the routing table)"
        );
    }
    let bpf_encap = tunnel == Tunnel::Vxlan
        && tunnel_encap.unwrap_or(true)
        && encryption == Encryption::Disabled;
    let c = ClusterConfig {
        endpoints,
        cluster_name,
        cluster_id: cluster_id.unwrap_or(0),
        node_ip,
        tunnel,
        encryption,
        bpf_encap,
        cluster_pod_cidr,
        lease_ttl: lease_ttl.unwrap_or(DEFAULT_KVSTORE_LEASE_TTL),
        gc_grace: gc_grace.unwrap_or(DEFAULT_IDENTITY_GC_GRACE),
        mutual_auth_port: mutual_auth_port.unwrap_or(sigil_mutual_auth::DEFAULT_PORT),
    };
    // Names as etcd keys take them: the kvstore's own check names the field and value.
    c.kvstore(node_name, None)
        .validate()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if c.tunnel == Tunnel::Vxlan && !c.node_ip.is_ipv4() {
        bail!(
            "node_ip: invalid value \"{}\": the VXLAN carrier needs an IPv4 underlay address \
             (or --tunnel disabled)",
            c.node_ip
        );
    }
    Ok(Some(c))
}

/// The reason alone of a field parser's error (the layer's error names the field and value itself).
fn reason(field: &str, value: &str, e: anyhow::Error) -> String {
    let full = format!("{e:#}");
    full.strip_prefix(&format!("{field}: invalid value {value:?}: "))
        .map(str::to_owned)
        .unwrap_or(full)
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_refuse_bad_values_by_field() {
        let c = PodCidr::<Ipv4Addr>::parse("pod_cidr", "10.200.0.0/24").expect("v4");
        assert_eq!(c.host(2), Some(Ipv4Addr::new(10, 200, 0, 2)));
        assert_eq!(c.host(255), None);
        let e = PodCidr::<Ipv4Addr>::parse("pod_cidr", "10.200.0.1/24").expect_err("host bits");
        assert!(e.to_string().contains("pod_cidr") && e.to_string().contains("host bits"));
        let e = PodCidr::<Ipv4Addr>::parse("pod_cidr", "fd00::/64").expect_err("family");
        assert!(e.to_string().contains("not an IPv4"), "{e}");
        let v6 = PodCidr::<Ipv6Addr>::parse("pod_cidr_v6", "fd00:200::/64").expect("v6");
        assert_eq!(v6.host(2), "fd00:200::2".parse().ok());
    }

    #[test]
    fn flags_override_the_file_and_bad_enforcement_is_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("netd.toml");
        std::fs::write(&file, "node_name = \"a\"\npod_cidr = \"10.1.0.0/16\"\n").expect("write");
        let args = RunArgs {
            config: Some(file.clone()),
            node_name: Some("b".into()),
            ..RunArgs::default()
        };
        let c = Config::from_args(&args).expect("config");
        assert_eq!(c.node_name, "b");
        assert_eq!(c.pod_cidr.to_string(), "10.1.0.0/16");
        let bad = RunArgs {
            enforcement: Some("sometimes".into()),
            ..args
        };
        let e = Config::from_args(&bad).expect_err("enforcement");
        assert!(e.to_string().contains("enforcement") && e.to_string().contains("sometimes"));
    }

    #[test]
    fn tunnel_encap_is_bpf_by_default_and_device_with_encryption() {
        let bpf =
            |a: RunArgs| Config::from_layers(&a, env(&[])).map(|c| c.cluster.map(|c| c.bpf_encap));
        let vx = || RunArgs {
            tunnel: Some("vxlan".into()),
            ..cluster_args()
        };
        assert_eq!(bpf(vx()).expect("default"), Some(true));
        assert_eq!(bpf(cluster_args()).expect("no tunnel"), Some(false));
        let device = RunArgs {
            tunnel_encap: Some("device".into()),
            ..vx()
        };
        assert_eq!(bpf(device).expect("device"), Some(false));
        let sock = Some(PathBuf::from("/run/agent/api.sock"));
        let spiffe = RunArgs {
            encryption: Some("spiffe".into()),
            agent_workload_socket: sock.clone(),
            ..vx()
        };
        assert_eq!(bpf(spiffe.clone()).expect("spiffe"), Some(false));
        for (args, want) in [
            (
                RunArgs {
                    tunnel_encap: Some("bpf".into()),
                    ..spiffe
                },
                "tunnel_encap: invalid value \"bpf\": not with encryption spiffe",
            ),
            (
                RunArgs {
                    tunnel_encap: Some("kernel".into()),
                    ..vx()
                },
                "tunnel_encap: invalid value \"kernel\"",
            ),
            (
                RunArgs {
                    tunnel_encap: Some("device".into()),
                    tunnel: Some("disabled".into()),
                    ..cluster_args()
                },
                "tunnel_encap: set with tunnel disabled",
            ),
            (
                RunArgs {
                    tunnel_encap: Some("bpf".into()),
                    ..RunArgs::default()
                },
                "tunnel_encap: set without kvstore",
            ),
        ] {
            let e = bpf(args).expect_err(want).to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn encryption_spiffe_needs_the_cluster_vxlan_and_a_node_svid_source() {
        let vx = || RunArgs {
            tunnel: Some("vxlan".into()),
            ..cluster_args()
        };
        let sock = Some(PathBuf::from("/run/agent/api.sock"));
        let ok = Config::from_layers(
            &RunArgs {
                encryption: Some("spiffe".into()),
                agent_workload_socket: sock.clone(),
                ..vx()
            },
            env(&[]),
        )
        .expect("spiffe");
        assert_eq!(
            ok.cluster.map(|c| c.encryption),
            Some(Encryption::Spiffe {
                workload_socket: PathBuf::from("/run/agent/api.sock")
            })
        );
        let off = Config::from_layers(&vx(), env(&[])).expect("default");
        assert_eq!(
            off.cluster.map(|c| c.encryption),
            Some(Encryption::Disabled)
        );
        let cases = [
            (
                RunArgs {
                    encryption: Some("wireguard".into()),
                    ..vx()
                },
                "encryption: invalid value \"wireguard\"",
            ),
            (
                RunArgs {
                    encryption: Some("spiffe".into()),
                    ..vx()
                },
                "needs agent_workload_socket",
            ),
            (
                RunArgs {
                    encryption: Some("spiffe".into()),
                    agent_workload_socket: sock.clone(),
                    tunnel: Some("disabled".into()),
                    ..vx()
                },
                "encryption: invalid value \"spiffe\": needs tunnel vxlan",
            ),
            (
                RunArgs {
                    encryption: Some("spiffe".into()),
                    agent_workload_socket: sock.clone(),
                    ..RunArgs::default()
                },
                "encryption: set without kvstore",
            ),
            (
                RunArgs {
                    encryption: Some("spiffe".into()),
                    agent_workload_socket: Some(PathBuf::from("rel/api.sock")),
                    ..vx()
                },
                "agent_workload_socket: invalid value \"rel/api.sock\"",
            ),
        ];
        for (args, want) in cases {
            let e = format!(
                "{:#}",
                Config::from_layers(&args, env(&[])).expect_err(want)
            );
            assert!(e.contains(want), "{e}");
        }
        // disabled is allowed without a cluster (it changes nothing).
        Config::from_layers(
            &RunArgs {
                encryption: Some("disabled".into()),
                ..RunArgs::default()
            },
            env(&[]),
        )
        .expect("disabled on a single node");
    }

    fn cluster_args() -> RunArgs {
        RunArgs {
            node_name: Some("node-a".into()),
            kvstore: Some("etcd".into()),
            kvstore_endpoints: Some("http://10.0.0.1:2379,http://10.0.0.2:2379".into()),
            node_ip: Some("192.168.1.1".into()),
            tunnel: Some("disabled".into()),
            ..RunArgs::default()
        }
    }

    #[test]
    fn cluster_flags_are_checked_by_name_and_value() {
        let c = Config::from_layers(&cluster_args(), env(&[])).expect("cluster config");
        let cc = c.cluster.expect("cluster mode");
        assert_eq!(cc.endpoints.len(), 2);
        assert_eq!(cc.cluster_id, 0);
        assert_eq!(cc.lease_ttl, DEFAULT_KVSTORE_LEASE_TTL);
        assert_eq!(cc.gc_grace, DEFAULT_IDENTITY_GC_GRACE);
        assert_eq!(cc.mutual_auth_port, 4250);
        assert!(
            Config::from_layers(&RunArgs::default(), env(&[]))
                .expect("single")
                .cluster
                .is_none()
        );
        let bad = |args: RunArgs, needles: &[&str]| {
            let e = format!(
                "{:#}",
                Config::from_layers(&args, env(&[])).expect_err("refused")
            );
            for n in needles {
                assert!(e.contains(n), "{n:?} not in {e}");
            }
        };
        bad(
            RunArgs {
                kvstore: Some("consul".into()),
                ..cluster_args()
            },
            &["kvstore", "consul"],
        );
        bad(
            RunArgs {
                cluster_id: Some("256".into()),
                ..cluster_args()
            },
            &["cluster_id", "256", "0..=255"],
        );
        bad(
            RunArgs {
                cluster_id: Some("-1".into()),
                ..cluster_args()
            },
            &["cluster_id", "-1"],
        );
        bad(
            RunArgs {
                node_ip: Some("0.0.0.0".into()),
                ..cluster_args()
            },
            &["node_ip", "0.0.0.0"],
        );
        bad(
            RunArgs {
                node_ip: Some("node-a".into()),
                ..cluster_args()
            },
            &["node_ip", "not an IP"],
        );
        bad(
            RunArgs {
                node_ip: None,
                ..cluster_args()
            },
            &["node_ip", "required"],
        );
        bad(
            RunArgs {
                kvstore_endpoints: None,
                ..cluster_args()
            },
            &["kvstore_endpoints", "required"],
        );
        bad(
            RunArgs {
                kvstore_endpoints: Some("https://x:1".into()),
                ..cluster_args()
            },
            &["kvstore_endpoints", "https://x:1", "http://"],
        );
        bad(
            RunArgs {
                tunnel: Some("geneve".into()),
                ..cluster_args()
            },
            &["tunnel", "geneve"],
        );
        for port in ["0", "65536", "https"] {
            bad(
                RunArgs {
                    mutual_auth_port: Some(port.into()),
                    ..cluster_args()
                },
                &["mutual_auth_port", port],
            );
        }
        let vx = Config::from_layers(
            &RunArgs {
                tunnel: None,
                ..cluster_args()
            },
            env(&[]),
        )
        .expect("vxlan by default");
        assert_eq!(vx.cluster.expect("cluster").tunnel, Tunnel::Vxlan);
        bad(
            RunArgs {
                tunnel: None,
                node_ip: Some("fd00::1".into()),
                ..cluster_args()
            },
            &["node_ip", "fd00::1", "IPv4"],
        );
        bad(
            RunArgs {
                kvstore_lease_ttl: Some("1s".into()),
                ..cluster_args()
            },
            &["kvstore_lease_ttl", "1s"],
        );
        bad(
            RunArgs {
                cluster_name: Some("Bad_Name".into()),
                ..cluster_args()
            },
            &["cluster_name", "Bad_Name"],
        );
        bad(
            RunArgs {
                node_name: Some("Node_A".into()),
                ..cluster_args()
            },
            &["node_name", "Node_A"],
        );
        bad(
            RunArgs {
                cluster_pod_cidr: Some("10.0.0.0/25".into()),
                ..cluster_args()
            },
            &["cluster_pod_cidr", "10.0.0.0/25", "/24"],
        );
        bad(
            RunArgs {
                cluster_pod_cidr: Some("10.0.0.0/16".into()),
                pod_cidr: Some("10.0.1.0/24".into()),
                ..cluster_args()
            },
            &["cluster_pod_cidr", "pod_cidr"],
        );
        bad(
            RunArgs {
                spiffe_id_mode: Some("opaque".into()),
                trust_domain: Some("example.org".into()),
                agent_spiffe_id: Some("spiffe://example.org/agent".into()),
                server_address: Some("127.0.0.1:8081".into()),
                ..cluster_args()
            },
            &["spiffe_id_mode", "opaque", "kvstore"],
        );
        // Cluster settings without a kvstore are a mistake, not ignored.
        bad(
            RunArgs {
                node_ip: Some("192.168.1.1".into()),
                ..RunArgs::default()
            },
            &["node_ip", "without kvstore"],
        );
    }

    fn env(pairs: &[(&str, &str)]) -> impl FnOnce(Option<&Path>) -> sigil_daemon::Layers {
        let map = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |path| sigil_daemon::Layers::with_env("netd", path, map)
    }

    #[test]
    fn environment_sits_between_file_and_flags() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("netd.toml");
        std::fs::write(
            &file,
            "node_name = \"a\"\nlog_level = \"warn\"\nlog_format = \"json\"\n",
        )
        .expect("write");
        let args = RunArgs {
            config: Some(file.clone()),
            ..RunArgs::default()
        };
        let c = Config::from_layers(&args, env(&[])).expect("file only");
        assert_eq!((c.node_name.as_str(), c.log_level.as_str()), ("a", "warn"));
        assert_eq!(c.log_format, sigil_daemon::LogFormat::Json);
        assert_eq!(c.drain_timeout, sigil_daemon::DEFAULT_DRAIN_TIMEOUT);
        let vars = [
            ("SIGIL_NETD_NODE_NAME", "b"),
            ("SIGIL_NETD_DRAIN_TIMEOUT", "250ms"),
            ("SIGIL_NETD_POLICY_MAP_MAX_ENTRIES", "64"),
        ];
        let c = Config::from_layers(&args, env(&vars)).expect("env");
        assert_eq!(c.node_name, "b");
        assert_eq!(c.drain_timeout, std::time::Duration::from_millis(250));
        assert_eq!(c.policy_map_max_entries, Some(64));
        let flagged = RunArgs {
            node_name: Some("c".into()),
            ..args.clone()
        };
        assert_eq!(
            Config::from_layers(&flagged, env(&vars))
                .expect("flag")
                .node_name,
            "c"
        );
    }

    #[test]
    fn invalid_log_options_name_the_key_the_source_and_the_value() {
        let bad_level = RunArgs {
            common: CommonArgs {
                log_level: Some("loud".into()),
                ..Default::default()
            },
            ..RunArgs::default()
        };
        let e = Config::from_layers(&bad_level, env(&[])).expect_err("level");
        assert_eq!(
            e.to_string(),
            "log_level: invalid value \"loud\" from flag: error, warn, info, debug or trace"
        );
        let e = Config::from_layers(
            &RunArgs::default(),
            env(&[("SIGIL_NETD_LOG_FORMAT", "xml")]),
        )
        .expect_err("format");
        assert_eq!(
            e.to_string(),
            "log_format: invalid value \"xml\" from environment variable SIGIL_NETD_LOG_FORMAT: text or json"
        );
        let e = Config::from_layers(
            &RunArgs::default(),
            env(&[("SIGIL_NETD_POD_CIDR", "10.0.0.1/24")]),
        )
        .expect_err("cidr");
        assert_eq!(
            e.to_string(),
            "pod_cidr: invalid value \"10.0.0.1/24\" from environment variable SIGIL_NETD_POD_CIDR: host bits are set"
        );
        let e = Config::from_layers(
            &RunArgs::default(),
            env(&[("SIGIL_NETD_POLICY_MAP_MAX_ENTRIES", "lots")]),
        )
        .expect_err("number");
        assert!(
            e.to_string().starts_with(
                "policy_map_max_entries: invalid value \"lots\" from environment variable"
            ),
            "{e}"
        );
    }

    #[test]
    fn identity_mode_defaults_to_spiffe_with_an_agent_socket_and_bad_values_are_named() {
        let c = Config::from_layers(&RunArgs::default(), env(&[])).expect("default");
        assert_eq!(c.identity_mode, IdentityMode::Classic);
        assert_eq!(c.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert_eq!(c.identity_fallback_wait, DEFAULT_IDENTITY_FALLBACK_WAIT);
        let with_socket = RunArgs {
            agent_socket: Some("/run/a/admin.sock".into()),
            identity_fallback_wait: Some("250ms".into()),
            ..RunArgs::default()
        };
        let c = Config::from_layers(&with_socket, env(&[])).expect("socket");
        assert_eq!(c.identity_mode, IdentityMode::Spiffe);
        assert_eq!(
            c.identity_fallback_wait,
            std::time::Duration::from_millis(250)
        );
        let c = Config::from_layers(
            &RunArgs::default(),
            env(&[("SIGIL_NETD_IDENTITY_MODE", "spiffe")]),
        )
        .expect("env mode");
        assert_eq!(c.identity_mode, IdentityMode::Spiffe);
        let bad = RunArgs {
            identity_mode: Some("magic".into()),
            ..RunArgs::default()
        };
        let e = Config::from_layers(&bad, env(&[])).expect_err("mode");
        assert_eq!(
            e.to_string(),
            "identity_mode: invalid value \"magic\" from flag: spiffe or classic"
        );
        let e = Config::from_layers(
            &RunArgs::default(),
            env(&[("SIGIL_NETD_IDENTITY_FALLBACK_WAIT", "soon")]),
        )
        .expect_err("wait");
        assert!(
            e.to_string().starts_with(
                "identity_fallback_wait: invalid value \"soon\" from environment variable SIGIL_NETD_IDENTITY_FALLBACK_WAIT"
            ),
            "{e}"
        );
    }

    #[test]
    fn hubble_defaults_beside_the_api_socket_and_a_remote_listener_needs_consent() {
        let c = Config::from_layers(&RunArgs::default(), env(&[])).expect("default");
        assert_eq!(c.hubble.socket, PathBuf::from("/run/sigil/hubble.sock"));
        assert_eq!(
            (c.hubble.max_flows, c.hubble.max_follow_streams),
            (4095, 64)
        );
        assert_eq!(c.hubble.listen_address, None);
        let local = RunArgs {
            hubble_listen_address: Some("127.0.0.1:4244".into()),
            ..RunArgs::default()
        };
        let c = Config::from_layers(&local, env(&[])).expect("loopback");
        assert_eq!(
            c.hubble.listen_address,
            Some("127.0.0.1:4244".parse().unwrap())
        );
        let remote = RunArgs {
            hubble_listen_address: Some("0.0.0.0:4244".into()),
            ..RunArgs::default()
        };
        let e = Config::from_layers(&remote, env(&[])).expect_err("remote");
        assert!(
            e.to_string().starts_with(
                "hubble_listen_address: invalid value \"0.0.0.0:4244\" from flag: not a loopback"
            ),
            "{e}"
        );
        let allowed = RunArgs {
            hubble_listen_allow_remote: Some(true),
            ..remote
        };
        let c = Config::from_layers(&allowed, env(&[])).expect("allowed");
        assert!(c.hubble.listen_address.is_some());
        for (args, want) in [
            (
                RunArgs {
                    hubble_max_flows: Some(0),
                    ..RunArgs::default()
                },
                "hubble_max_flows: invalid value 0",
            ),
            (
                RunArgs {
                    hubble_max_follow_streams: Some(0),
                    ..RunArgs::default()
                },
                "hubble_max_follow_streams: invalid value 0",
            ),
            (
                RunArgs {
                    hubble_socket: Some(DEFAULT_API_SOCKET.into()),
                    ..RunArgs::default()
                },
                "hubble_socket: invalid value",
            ),
            (
                RunArgs {
                    hubble_listen_address: Some("localhost".into()),
                    ..RunArgs::default()
                },
                "hubble_listen_address: invalid value \"localhost\"",
            ),
        ] {
            let e = Config::from_layers(&args, env(&[])).expect_err(want);
            assert!(e.to_string().starts_with(want), "{e}");
        }
    }
}
