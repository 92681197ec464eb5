//! sigil-agent's configuration: a TOML file, overridden by `SIGIL_AGENT_<KEY>`
//! environment variables, overridden by flags (see [`sigil_daemon::Layers`]), validated once at start.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use sigil_daemon::CommonArgs;
use sigil_spiffe::{SpiffeId, TrustDomain};

/// Default Workload API socket (open to all local users: callers are attested, not trusted by permission).
pub const DEFAULT_SOCKET_PATH: &str = "/run/sigil/agent/public/api.sock";
/// Default admin socket (Delegated Identity API), in a 0700 directory.
pub const DEFAULT_ADMIN_SOCKET_PATH: &str = "/run/sigil/agent/private/admin.sock";
/// Default data directory (agent SVID, key, bundle).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/sigil/agent";
/// Default sigil-netd API socket, asked by the endpoint workload attestor (netd's own default).
pub const DEFAULT_NETD_SOCKET: &str = "/run/sigil/netd.sock";
/// The `netd_socket` value that turns endpoint workload attestation off.
pub const NETD_SOCKET_NONE: &str = "none";
/// Default bound on cached SVIDs no workload is using (SPIRE's `x509_svid_cache_max_size`).
pub const DEFAULT_SVID_CACHE_MAX: usize = 1000;

/// Flags of `sigil agent run`; each overrides the same key of the TOML file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AgentRunArgs {
    /// TOML configuration file.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Address of sigil-server's agent API (HOST:PORT).
    #[arg(long)]
    pub server_address: Option<String>,
    /// Trust domain name.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// PEM file with the trust domain's X.509 authorities, used to authenticate the server at first contact.
    #[arg(long)]
    pub trust_bundle: Option<PathBuf>,
    /// Trust the server without a bundle at first contact (insecure; logged as a warning).
    #[arg(long)]
    pub insecure_bootstrap: bool,
    /// Join token for node attestation.
    #[arg(long)]
    pub join_token: Option<String>,
    /// x509pop: PEM certificate chain of the node (leaf first).
    #[arg(long, requires = "x509pop_key")]
    pub x509pop_cert: Option<PathBuf>,
    /// x509pop: PEM private key of the node certificate.
    #[arg(long, requires = "x509pop_cert")]
    pub x509pop_key: Option<PathBuf>,
    /// Directory for the agent SVID, its key and the bundle.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Workload API socket path.
    #[arg(long)]
    pub socket_path: Option<PathBuf>,
    /// Admin socket path (Delegated Identity API).
    #[arg(long)]
    pub admin_socket_path: Option<PathBuf>,
    /// SPIFFE ID allowed to use the Delegated Identity API (repeatable).
    #[arg(long = "authorized-delegate")]
    pub authorized_delegates: Vec<String>,
    /// sigil-netd's API socket, asked which endpoint a caller's network namespace belongs to (its
    /// `k8s:` selectors); `none` turns endpoint workload attestation off.
    #[arg(long, value_name = "PATH")]
    pub netd_socket: Option<String>,
    /// Most SVIDs kept for entries no workload is using.
    #[arg(long)]
    pub x509_svid_cache_max_size: Option<usize>,
    /// Log options and drain bound, as every daemon has them.
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    server_address: Option<String>,
    trust_domain: Option<String>,
    trust_bundle: Option<PathBuf>,
    insecure_bootstrap: Option<bool>,
    join_token: Option<String>,
    x509pop_cert: Option<PathBuf>,
    x509pop_key: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    socket_path: Option<PathBuf>,
    admin_socket_path: Option<PathBuf>,
    authorized_delegates: Option<Vec<String>>,
    netd_socket: Option<String>,
    x509_svid_cache_max_size: Option<usize>,
    drain_timeout: Option<String>,
    metrics_address: Option<String>,
    log_level: Option<String>,
    log_format: Option<String>,
}

/// How the node proves itself to the server.
#[derive(Debug, Clone)]
pub enum NodeAttestation {
    /// A single-use join token.
    JoinToken(String),
    /// Proof of possession of an X.509 key.
    X509Pop {
        /// PEM certificate chain.
        cert: PathBuf,
        /// PEM private key.
        key: PathBuf,
    },
    /// No attestor configured: only a stored SVID can be used.
    None,
}

/// Validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Server agent API address.
    pub server_address: String,
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Bootstrap bundle path.
    pub trust_bundle: Option<PathBuf>,
    /// Skip server authentication at first contact.
    pub insecure_bootstrap: bool,
    /// Node attestation method.
    pub attestation: NodeAttestation,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Workload API socket.
    pub socket_path: PathBuf,
    /// Admin socket.
    pub admin_socket_path: PathBuf,
    /// Authorized delegates.
    pub authorized_delegates: Vec<SpiffeId>,
    /// sigil-netd's API socket for endpoint workload attestation; `None` when turned off.
    pub netd_socket: Option<PathBuf>,
    /// SVID cache bound for unused entries.
    pub svid_cache_max: usize,
    /// Bound on finishing in-flight calls after SIGTERM.
    pub drain_timeout: std::time::Duration,
    /// Where Prometheus metrics are served (`None`: not served).
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Log level.
    pub log_level: String,
    /// JSON logs.
    pub log_json: bool,
}

impl AgentConfig {
    /// Builds the configuration from the optional TOML file and the flags (flags win).
    pub fn from_args(args: &AgentRunArgs) -> anyhow::Result<Self> {
        let l = sigil_daemon::Layers::new("agent", args.config.as_deref());
        let file: FileConfig = l.read_file()?;
        let server_address = l
            .get(
                "server_address",
                args.server_address.clone(),
                file.server_address,
            )?
            .unwrap_or_else(|| "127.0.0.1:8081".to_string());
        if !server_address.contains(':') {
            bail!("server_address: invalid value {server_address:?} (want HOST:PORT)");
        }
        let td = l
            .get("trust_domain", args.trust_domain.clone(), file.trust_domain)?
            .unwrap_or_else(|| "identity.example.com".to_string());
        let trust_domain = TrustDomain::parse(&td)
            .with_context(|| format!("trust_domain: invalid value {td:?}"))?;
        let trust_bundle = l.get("trust_bundle", args.trust_bundle.clone(), file.trust_bundle)?;
        let insecure_bootstrap =
            args.insecure_bootstrap || file.insecure_bootstrap.unwrap_or(false);
        let join_token = l.get("join_token", args.join_token.clone(), file.join_token)?;
        let cert = l.get("x509pop_cert", args.x509pop_cert.clone(), file.x509pop_cert)?;
        let key = l.get("x509pop_key", args.x509pop_key.clone(), file.x509pop_key)?;
        let attestation = match (join_token, cert, key) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                bail!("join_token / x509pop_cert: choose one node attestation method, not both")
            }
            (Some(t), None, None) if t.is_empty() => bail!("join_token: empty"),
            (Some(t), None, None) => NodeAttestation::JoinToken(t),
            (None, Some(cert), Some(key)) => NodeAttestation::X509Pop { cert, key },
            (None, Some(c), None) => {
                bail!("x509pop_key: missing (x509pop_cert is {})", c.display())
            }
            (None, None, Some(k)) => {
                bail!("x509pop_cert: missing (x509pop_key is {})", k.display())
            }
            (None, None, None) => NodeAttestation::None,
        };
        let data_dir = l
            .get("data_dir", args.data_dir.clone(), file.data_dir)?
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let socket_path = l
            .get("socket_path", args.socket_path.clone(), file.socket_path)?
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_PATH));
        let admin_socket_path = l
            .get(
                "admin_socket_path",
                args.admin_socket_path.clone(),
                file.admin_socket_path,
            )?
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET_PATH));
        check_socket_dirs(&socket_path, &admin_socket_path)?;
        let mut delegates_raw = args.authorized_delegates.clone();
        if delegates_raw.is_empty() {
            delegates_raw = file.authorized_delegates.unwrap_or_default();
        }
        let mut authorized_delegates = Vec::new();
        for (i, d) in delegates_raw.iter().enumerate() {
            authorized_delegates.push(
                SpiffeId::parse(d).with_context(|| {
                    format!("authorized_delegates[{i}]: invalid SPIFFE ID {d:?}")
                })?,
            );
        }
        let netd_socket = l
            .get("netd_socket", args.netd_socket.clone(), file.netd_socket)?
            .unwrap_or_else(|| DEFAULT_NETD_SOCKET.to_string());
        let netd_socket = match netd_socket.as_str() {
            NETD_SOCKET_NONE => None,
            p if Path::new(p).is_absolute() => Some(PathBuf::from(p)),
            p => bail!(
                "netd_socket: invalid value {p:?} (want an absolute path, or {NETD_SOCKET_NONE:?} to turn endpoint attestation off)"
            ),
        };
        let svid_cache_max = l
            .get(
                "x509_svid_cache_max_size",
                args.x509_svid_cache_max_size,
                file.x509_svid_cache_max_size,
            )?
            .unwrap_or(DEFAULT_SVID_CACHE_MAX);
        if svid_cache_max == 0 {
            bail!("x509_svid_cache_max_size: invalid value 0 (must be at least 1)");
        }
        let common = l.common(
            &args.common,
            CommonArgs::new(file.log_level, file.log_format, file.drain_timeout)
                .with_metrics_address(file.metrics_address),
        )?;
        let log_json = common.log_format == sigil_daemon::LogFormat::Json;
        Ok(AgentConfig {
            drain_timeout: common.drain_timeout,
            metrics_address: common.metrics_address,
            server_address,
            trust_domain,
            trust_bundle,
            insecure_bootstrap,
            attestation,
            data_dir,
            socket_path,
            admin_socket_path,
            authorized_delegates,
            netd_socket,
            svid_cache_max,
            log_level: common.log_level,
            log_json,
        })
    }
}

/// The admin socket must not sit in the public socket's directory (which is open to everyone).
fn check_socket_dirs(public: &Path, admin: &Path) -> anyhow::Result<()> {
    let pdir = public
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .with_context(|| format!("socket_path: {} has no directory", public.display()))?;
    let adir = admin
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .with_context(|| format!("admin_socket_path: {} has no directory", admin.display()))?;
    if adir.starts_with(pdir) {
        bail!(
            "admin_socket_path: {} is inside the public socket's directory {}; use a separate private directory",
            admin.display(),
            pdir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() -> anyhow::Result<()> {
        let c = AgentConfig::from_args(&AgentRunArgs::default())?;
        assert_eq!(c.socket_path, PathBuf::from(DEFAULT_SOCKET_PATH));
        assert_eq!(
            c.admin_socket_path,
            PathBuf::from(DEFAULT_ADMIN_SOCKET_PATH)
        );
        assert_eq!(c.svid_cache_max, 1000);
        assert!(matches!(c.attestation, NodeAttestation::None));
        assert_eq!(c.netd_socket, Some(PathBuf::from(DEFAULT_NETD_SOCKET)));
        Ok(())
    }

    #[test]
    fn netd_socket_none_turns_endpoint_attestation_off() -> anyhow::Result<()> {
        let c = AgentConfig::from_args(&AgentRunArgs {
            netd_socket: Some("none".into()),
            ..Default::default()
        })?;
        assert_eq!(c.netd_socket, None);
        let c = AgentConfig::from_args(&AgentRunArgs {
            netd_socket: Some("/tmp/x/netd.sock".into()),
            ..Default::default()
        })?;
        assert_eq!(c.netd_socket, Some(PathBuf::from("/tmp/x/netd.sock")));
        Ok(())
    }

    #[test]
    fn admin_socket_inside_public_dir_is_refused() {
        let err = AgentConfig::from_args(&AgentRunArgs {
            socket_path: Some("/tmp/a/public/api.sock".into()),
            admin_socket_path: Some("/tmp/a/public/admin.sock".into()),
            ..Default::default()
        })
        .expect_err("must fail");
        assert!(format!("{err:#}").contains("admin_socket_path"), "{err:#}");
    }

    #[test]
    fn bad_values_name_field_and_value() {
        for (args, want) in [
            (
                AgentRunArgs {
                    authorized_delegates: vec!["nope".into()],
                    ..Default::default()
                },
                "authorized_delegates[0]: invalid SPIFFE ID \"nope\"",
            ),
            (
                AgentRunArgs {
                    trust_domain: Some("UPPER".into()),
                    ..Default::default()
                },
                "trust_domain: invalid value \"UPPER\"",
            ),
            (
                AgentRunArgs {
                    x509_svid_cache_max_size: Some(0),
                    ..Default::default()
                },
                "x509_svid_cache_max_size: invalid value 0",
            ),
            (
                AgentRunArgs {
                    netd_socket: Some("".into()),
                    ..Default::default()
                },
                "netd_socket: invalid value \"\"",
            ),
            (
                AgentRunArgs {
                    netd_socket: Some("netd.sock".into()),
                    ..Default::default()
                },
                "netd_socket: invalid value \"netd.sock\"",
            ),
        ] {
            let err = format!(
                "{:#}",
                AgentConfig::from_args(&args).expect_err("must fail")
            );
            assert!(err.contains(want), "{err} lacks {want}");
        }
    }
}
