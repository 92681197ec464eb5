//! What sigil's daemons (server, agent, netd) share: parsing the log options, setting up logging on
//! stderr, and waiting for SIGTERM or SIGINT.

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

/// Why a directory for sockets or secrets cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// The path exists but is a symlink or not a directory.
    #[error("{path}: exists and is not a plain directory")]
    NotADirectory {
        /// The path.
        path: String,
    },
    /// The directory belongs to another user (someone could have planted it).
    #[error("{path}: owned by uid {owner}, not by this process (uid {me})")]
    ForeignOwner {
        /// The path.
        path: String,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// The directory is writable by group or others (a shared directory such as /tmp itself).
    #[error("{path}: writable by group or others (mode {mode:o}); use a directory of its own")]
    SharedDirectory {
        /// The path.
        path: String,
        /// Its mode bits.
        mode: u32,
    },
    /// Creating or changing the directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Makes sure `dir` is a directory of this process's user with exactly `mode`: creates it (and its
/// parents) if missing; an existing one must be a real directory owned by us and not writable by group or
/// others — so a root daemon never re-permissions a shared directory like /tmp, and never uses one that
/// another user planted.
pub fn own_dir(dir: &std::path::Path, mode: u32) -> Result<(), DirError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let path = dir.display().to_string();
    let io = |source| DirError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::symlink_metadata(dir) {
        Ok(m) => {
            if !m.file_type().is_dir() {
                return Err(DirError::NotADirectory { path });
            }
            let me = nix::unistd::geteuid().as_raw();
            if m.uid() != me {
                return Err(DirError::ForeignOwner {
                    path,
                    owner: m.uid(),
                    me,
                });
            }
            if m.mode() & 0o022 != 0 {
                return Err(DirError::SharedDirectory {
                    path,
                    mode: m.mode() & 0o7777,
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(dir)
                .map_err(io)?;
        }
        Err(e) => return Err(io(e)),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(io)
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
