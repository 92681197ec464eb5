//! sigil-netd's configuration: a TOML file, overridden by `SIGIL_NETD_<KEY>` environment variables,
//! overridden by flags (see [`sigil_daemon::Layers`]), validated once at start.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;
use sigil_daemon::CommonArgs;
use sigil_policy::{EnforcementMode, IpPrefix};

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
    policy_map_max_entries: Option<u32>,
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
    /// Policy map capacity when it is created (`None`: the object's 1 048 576).
    pub policy_map_max_entries: Option<u32>,
}

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
        let file: FileConfig = l.read_file()?;
        let node_name = l
            .get("node_name", args.node_name.clone(), file.node_name)?
            .unwrap_or_else(hostname);
        if node_name.is_empty() {
            bail!("node_name: invalid value \"\": must not be empty");
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
            CommonArgs::new(file.log_level, file.log_format, file.drain_timeout),
        )?;
        Ok(Self {
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
        })
    }
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
}
