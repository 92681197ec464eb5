//! What sigil's daemons (server, agent, netd) share: configuration layered the same way (TOML file,
//! `SIGIL_<DAEMON>_<KEY>` environment, flags) with the same log options, logging on stderr, waiting
//! for SIGTERM or SIGINT and draining, trusted socket and data directories (every ancestor checked)
//! and one socket-binding helper, readiness, one Prometheus registry, and listeners that neither
//! spin nor flood the log under a connection flood.
#![forbid(unsafe_code)]

pub mod accept;
pub mod dial;
pub mod dir;
pub mod health;
pub mod layer;
pub mod metrics;
pub mod runtime;

pub use accept::raise_fd_limit;
pub use dir::{DirError, check_peer, check_socket, connect_trusted, own_dir};
pub use health::Health;
pub use layer::{CommonArgs, CommonOptions, ConfigFileError, LayerError, Layers, Source};
pub use metrics::{GaugeFn, GrpcMetrics, serve_metrics};
pub use runtime::{
    BindError, DEFAULT_DRAIN_TIMEOUT, Metrics, Readiness, Runtime, bind_unix, drain,
};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A log option with a value outside its allowed set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogOptionError {
    /// `log_level` is not one of error, warn, info, debug, trace.
    #[error("log_level: invalid value {0:?} (error, warn, info, debug or trace)")]
    Level(String),
    /// `log_format` is not text or json.
    #[error("log_format: invalid value {0:?} (text or json)")]
    Format(String),
}

/// Checks a `log_level` value.
pub fn parse_log_level(value: &str) -> Result<String, LogOptionError> {
    match value {
        "error" | "warn" | "info" | "debug" | "trace" => Ok(value.to_string()),
        other => Err(LogOptionError::Level(other.to_string())),
    }
}

/// Parses a `log_format` value.
pub fn parse_log_format(value: &str) -> Result<LogFormat, LogOptionError> {
    match value {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(LogOptionError::Format(other.to_string())),
    }
}

/// Sets up logging on stderr at `level` (`RUST_LOG` overrides it); a second call is a no-op.
pub fn init_logging(level: &str, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
}

/// Resolves on SIGTERM or SIGINT (or Ctrl-C where signals cannot be installed).
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {},
                _ = i.recv() => {},
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutdown signal received");
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_dir_creates_and_refuses_shared_or_odd_directories() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("tempdir");
        let d = root.path().join("a/b");
        super::own_dir(&d, 0o700).expect("created");
        let mode = std::fs::metadata(&d).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // A world-writable directory (like /tmp) is refused, not re-permissioned.
        let shared = root.path().join("shared");
        std::fs::create_dir(&shared).expect("mkdir");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        let e = super::own_dir(&shared, 0o700).expect_err("shared");
        assert!(e.to_string().contains("writable by group or others"), "{e}");
        // A symlink is refused.
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&d, &link).expect("symlink");
        assert!(super::own_dir(&link, 0o700).is_err());
        // A file is refused.
        let file = root.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        assert!(super::own_dir(&file, 0o700).is_err());
    }

    use super::*;

    #[test]
    fn options_are_checked_and_errors_name_field_and_value() {
        assert_eq!(parse_log_level("debug").as_deref(), Ok("debug"));
        assert_eq!(parse_log_format("json"), Ok(LogFormat::Json));
        let e = parse_log_level("loud").expect_err("bad level");
        assert!(
            e.to_string()
                .starts_with("log_level: invalid value \"loud\"")
        );
        let e = parse_log_format("xml").expect_err("bad format");
        assert!(
            e.to_string()
                .starts_with("log_format: invalid value \"xml\"")
        );
    }
}
