//! sigil-server's configuration: a TOML file, overridden by `SIGIL_SERVER_<KEY>`
//! environment variables, overridden by flags (see [`sigil_daemon::Layers`]), validated once at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use sigil_ca::{KeyType, UpstreamAuthority};
use sigil_daemon::CommonArgs;
use sigil_spiffe::TrustDomain;

/// Default trust domain, as seed 001 proposes.
pub const DEFAULT_TRUST_DOMAIN: &str = "identity.example.com";
/// Default address of the agent API.
pub const DEFAULT_BIND: &str = "127.0.0.1:8081";
/// Default path of the admin API socket (its directory is made 0700; every directory above it must be
/// root's or ours, never a shared one like /tmp).
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/sigil/server/private/api.sock";
/// Default data directory (SQLite database and CA keys).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/sigil/server";

/// Flags of `sigil server run`; each overrides the same key of the TOML file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// TOML configuration file.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Directory for the SQLite database and CA keys.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Trust domain name.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Address of the agent API (TLS over TCP).
    #[arg(long)]
    pub bind: Option<String>,
    /// Path of the admin API Unix socket.
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
    /// CA key type: ec-p256, ec-p384 or rsa-2048.
    #[arg(long)]
    pub ca_key_type: Option<String>,
    /// Lifetime of a CA (e.g. 24h).
    #[arg(long)]
    pub ca_ttl: Option<String>,
    /// Default X.509-SVID lifetime (e.g. 1h).
    #[arg(long)]
    pub x509_svid_ttl: Option<String>,
    /// Default JWT-SVID lifetime (e.g. 5m).
    #[arg(long)]
    pub jwt_svid_ttl: Option<String>,
    /// PEM certificate (chain) of an upstream CA; sigil's CA becomes its intermediate.
    #[arg(long, requires = "upstream_key")]
    pub upstream_cert: Option<PathBuf>,
    /// PEM private key of the upstream CA.
    #[arg(long, requires = "upstream_cert")]
    pub upstream_key: Option<PathBuf>,
    /// PEM bundle of CAs trusted for x509pop node attestation (enables x509pop).
    #[arg(long)]
    pub x509pop_ca_bundle: Option<PathBuf>,
    /// Bound on an agent API TLS handshake (e.g. 10s); slower connections are closed.
    #[arg(long)]
    pub handshake_timeout: Option<String>,
    /// Most agent API TLS handshakes in progress at once; beyond it the oldest is dropped.
    #[arg(long)]
    pub max_pending_handshakes: Option<usize>,
    /// Most agent API connections open at once from one source address (IPv6: one /64); more are
    /// closed at accept.
    #[arg(long)]
    pub max_connections_per_source: Option<usize>,
    /// Log options and drain bound, as every daemon has them.
    #[command(flatten)]
    pub common: CommonArgs,
}

/// The TOML file's shape (every key optional; unknown keys are rejected).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    trust_domain: Option<String>,
    bind: Option<String>,
    admin_socket: Option<PathBuf>,
    ca_key_type: Option<String>,
    ca_ttl: Option<String>,
    x509_svid_ttl: Option<String>,
    jwt_svid_ttl: Option<String>,
    upstream_cert: Option<PathBuf>,
    upstream_key: Option<PathBuf>,
    x509pop_ca_bundle: Option<PathBuf>,
    handshake_timeout: Option<String>,
    max_pending_handshakes: Option<usize>,
    max_connections_per_source: Option<usize>,
    log_level: Option<String>,
    log_format: Option<String>,
    drain_timeout: Option<String>,
    metrics_address: Option<String>,
}

pub use sigil_daemon::LogFormat;

/// Validated server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Directory for the SQLite database and CA keys.
    pub data_dir: PathBuf,
    /// The trust domain this server is the authority of (as configured; a migration may have moved it).
    pub trust_domain: TrustDomain,
    /// Address of the agent API.
    pub bind: SocketAddr,
    /// Path of the admin API socket.
    pub admin_socket: PathBuf,
    /// CA key type.
    pub ca_key_type: KeyType,
    /// CA lifetime.
    pub ca_ttl: Duration,
    /// Default X.509-SVID lifetime.
    pub x509_svid_ttl: Duration,
    /// Default JWT-SVID lifetime.
    pub jwt_svid_ttl: Duration,
    /// Optional upstream CA.
    pub upstream: Option<UpstreamAuthority>,
    /// Optional CA bundle for x509pop attestation.
    pub x509pop_ca_bundle: Option<PathBuf>,
    /// Handshake timeout and cap on handshakes in progress of the agent API.
    pub handshake_limits: sigil_daemon::accept::HandshakeLimits,
    /// Log level filter.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Bound on finishing in-flight calls after SIGTERM.
    pub drain_timeout: Duration,
    /// Where Prometheus metrics are served (`None`: not served).
    pub metrics_address: Option<std::net::SocketAddr>,
}

fn parse_duration(field: &str, value: &str) -> anyhow::Result<Duration> {
    let d = humantime::parse_duration(value)
        .with_context(|| format!("{field}: invalid duration {value:?} (use e.g. 90s, 5m, 1h)"))?;
    if d.is_zero() {
        bail!("{field}: duration {value:?} must be greater than zero");
    }
    Ok(d)
}

impl ServerConfig {
    /// Builds the configuration from the optional TOML file and the flags (flags win).
    pub fn from_args(args: &RunArgs) -> anyhow::Result<Self> {
        let l = sigil_daemon::Layers::new("server", args.config.as_deref());
        let file: FileConfig = l.read_file()?;
        let data_dir = l
            .get("data_dir", args.data_dir.clone(), file.data_dir)?
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let td_str = l
            .get("trust_domain", args.trust_domain.clone(), file.trust_domain)?
            .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_string());
        let trust_domain = TrustDomain::parse(&td_str)
            .with_context(|| format!("trust_domain: invalid value {td_str:?}"))?;
        let bind_str = l
            .get("bind", args.bind.clone(), file.bind)?
            .unwrap_or_else(|| DEFAULT_BIND.to_string());
        let bind: SocketAddr = bind_str
            .parse()
            .with_context(|| format!("bind: invalid address {bind_str:?} (want IP:PORT)"))?;
        let admin_socket = l
            .get("admin_socket", args.admin_socket.clone(), file.admin_socket)?
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET));
        if admin_socket
            .parent()
            .is_none_or(|p| p.as_os_str().is_empty())
        {
            bail!(
                "admin_socket: {} has no parent directory",
                admin_socket.display()
            );
        }
        let kt = l
            .get("ca_key_type", args.ca_key_type.clone(), file.ca_key_type)?
            .unwrap_or_else(|| "ec-p256".to_string());
        let ca_key_type: KeyType = kt.parse().map_err(|_| {
            anyhow::anyhow!("ca_key_type: invalid value {kt:?} (ec-p256, ec-p384 or rsa-2048)")
        })?;
        let ca_ttl = parse_duration(
            "ca_ttl",
            &l.get("ca_ttl", args.ca_ttl.clone(), file.ca_ttl)?
                .unwrap_or("24h".into()),
        )?;
        let x509_svid_ttl = parse_duration(
            "x509_svid_ttl",
            &l.get(
                "x509_svid_ttl",
                args.x509_svid_ttl.clone(),
                file.x509_svid_ttl,
            )?
            .unwrap_or("1h".into()),
        )?;
        let jwt_svid_ttl = parse_duration(
            "jwt_svid_ttl",
            &l.get("jwt_svid_ttl", args.jwt_svid_ttl.clone(), file.jwt_svid_ttl)?
                .unwrap_or("5m".into()),
        )?;
        let upstream_cert = l.get(
            "upstream_cert",
            args.upstream_cert.clone(),
            file.upstream_cert,
        )?;
        let upstream_key = l.get("upstream_key", args.upstream_key.clone(), file.upstream_key)?;
        let upstream = match (upstream_cert, upstream_key) {
            (Some(cert_chain_pem), Some(key_pem)) => Some(UpstreamAuthority {
                cert_chain_pem,
                key_pem,
            }),
            (None, None) => None,
            (Some(c), None) => bail!(
                "upstream_key: missing (upstream_cert is {}; both are needed)",
                c.display()
            ),
            (None, Some(k)) => bail!(
                "upstream_cert: missing (upstream_key is {}; both are needed)",
                k.display()
            ),
        };
        let handshake_timeout = match l.get(
            "handshake_timeout",
            args.handshake_timeout.clone(),
            file.handshake_timeout,
        )? {
            Some(v) => parse_duration("handshake_timeout", &v)?,
            None => sigil_daemon::accept::DEFAULT_HANDSHAKE_TIMEOUT,
        };
        let max_pending = l
            .get(
                "max_pending_handshakes",
                args.max_pending_handshakes,
                file.max_pending_handshakes,
            )?
            .unwrap_or(sigil_daemon::accept::DEFAULT_MAX_PENDING_HANDSHAKES);
        if max_pending == 0 {
            bail!("max_pending_handshakes: invalid value 0 (must be at least 1)");
        }
        let max_connections_per_source = args
            .max_connections_per_source
            .or(file.max_connections_per_source)
            .unwrap_or(sigil_daemon::accept::DEFAULT_MAX_CONNECTIONS_PER_SOURCE);
        if max_connections_per_source == 0 {
            bail!("max_connections_per_source: invalid value 0 (must be at least 1)");
        }
        let handshake_limits = sigil_daemon::accept::HandshakeLimits {
            timeout: handshake_timeout,
            max_pending,
            max_connections_per_source,
            ..Default::default()
        };
        let common = l.common(
            &args.common,
            CommonArgs::new(file.log_level, file.log_format, file.drain_timeout)
                .with_metrics_address(file.metrics_address),
        )?;
        Ok(ServerConfig {
            drain_timeout: common.drain_timeout,
            metrics_address: common.metrics_address,
            data_dir,
            trust_domain,
            bind,
            admin_socket,
            ca_key_type,
            ca_ttl,
            x509_svid_ttl,
            jwt_svid_ttl,
            upstream,
            x509pop_ca_bundle: l.get(
                "x509pop_ca_bundle",
                args.x509pop_ca_bundle.clone(),
                file.x509pop_ca_bundle,
            )?,
            handshake_limits,
            log_level: common.log_level,
            log_format: common.log_format,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_ones() -> anyhow::Result<()> {
        let c = ServerConfig::from_args(&RunArgs::default())?;
        assert_eq!(c.trust_domain.as_str(), "identity.example.com");
        assert_eq!(c.bind.to_string(), "127.0.0.1:8081");
        assert_eq!(c.ca_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(c.x509_svid_ttl, Duration::from_secs(3600));
        assert_eq!(c.jwt_svid_ttl, Duration::from_secs(300));
        Ok(())
    }

    #[test]
    fn bad_values_name_the_field_and_value() {
        let cases: Vec<(RunArgs, &str)> = vec![
            (
                RunArgs {
                    trust_domain: Some("Bad.Domain".into()),
                    ..Default::default()
                },
                "trust_domain: invalid value \"Bad.Domain\"",
            ),
            (
                RunArgs {
                    bind: Some("nowhere".into()),
                    ..Default::default()
                },
                "bind: invalid address \"nowhere\"",
            ),
            (
                RunArgs {
                    ca_ttl: Some("0s".into()),
                    ..Default::default()
                },
                "ca_ttl: duration \"0s\"",
            ),
            (
                RunArgs {
                    ca_key_type: Some("dsa".into()),
                    ..Default::default()
                },
                "ca_key_type: invalid value \"dsa\"",
            ),
        ];
        for (args, want) in cases {
            let err = format!(
                "{:#}",
                ServerConfig::from_args(&args).expect_err("must fail")
            );
            assert!(err.contains(want), "{err} should contain {want}");
        }
    }

    #[test]
    fn file_values_are_overridden_by_flags() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("server.toml");
        std::fs::write(
            &path,
            "trust_domain = \"file.example\"\nbind = \"127.0.0.1:9000\"\n",
        )?;
        let c = ServerConfig::from_args(&RunArgs {
            config: Some(path.clone()),
            bind: Some("127.0.0.1:9001".into()),
            ..Default::default()
        })?;
        assert_eq!(c.trust_domain.as_str(), "file.example");
        assert_eq!(c.bind.port(), 9001);
        std::fs::write(&path, "bogus_key = 1\n")?;
        let err = ServerConfig::from_args(&RunArgs {
            config: Some(path),
            ..Default::default()
        })
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
        assert!(err.contains("bogus_key"), "{err}");
        Ok(())
    }
}
