//! One way for every daemon to layer its configuration: the TOML file, then the environment
//! (`SIGIL_<DAEMON>_<KEY>`), then the flags; a later layer wins. A bad value is reported with its key,
//! the layer it came from and the value itself.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A command-line flag (`--key`).
    Flag,
    /// An environment variable (its name).
    Env(String),
    /// The TOML file (its path), or the built-in default when no file names the key.
    File(Option<PathBuf>),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag => f.write_str("flag"),
            Source::Env(var) => write!(f, "environment variable {var}"),
            Source::File(Some(p)) => write!(f, "config file {}", p.display()),
            Source::File(None) => f.write_str("config file"),
        }
    }
}

/// A configuration value that its layer holds but that does not parse or validate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: invalid value {value:?} from {origin}: {reason}")]
pub struct LayerError {
    /// The configuration key (as in the TOML file).
    pub key: String,
    /// The layer the value came from.
    pub origin: Source,
    /// The value as given.
    pub value: String,
    /// Why it is refused.
    pub reason: String,
}

/// The environment layer of one daemon and the path of its file, for looking keys up in order.
#[derive(Debug, Clone)]
pub struct Layers {
    prefix: String,
    env: HashMap<String, String>,
    file: Option<PathBuf>,
}

impl Layers {
    /// The layers of `daemon` (`server`, `agent`, `netd`) with this process's environment.
    pub fn new(daemon: &str, file: Option<&Path>) -> Self {
        let prefix = env_prefix(daemon);
        let env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.starts_with(&prefix))
            .collect();
        Self {
            prefix,
            env,
            file: file.map(Path::to_path_buf),
        }
    }

    /// The layers with a given environment (tests, or a caller that filters it).
    pub fn with_env(daemon: &str, file: Option<&Path>, env: HashMap<String, String>) -> Self {
        Self {
            prefix: env_prefix(daemon),
            env,
            file: file.map(Path::to_path_buf),
        }
    }

    /// The environment variable that sets `key` (e.g. `SIGIL_NETD_LOG_LEVEL`).
    pub fn env_var(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key.to_ascii_uppercase())
    }

    /// The raw value of `key` and its source: the flag, else the environment, else the file.
    pub fn raw(
        &self,
        key: &str,
        flag: Option<String>,
        file: Option<String>,
    ) -> Option<(String, Source)> {
        if let Some(v) = flag {
            return Some((v, Source::Flag));
        }
        let var = self.env_var(key);
        if let Some(v) = self.env.get(&var) {
            return Some((v.clone(), Source::Env(var)));
        }
        file.map(|v| (v, Source::File(self.file.clone())))
    }

    /// `key` parsed by `parse` from the winning layer; an error names the key, layer and value.
    pub fn parse<T, E: fmt::Display>(
        &self,
        key: &str,
        flag: Option<String>,
        file: Option<String>,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Result<Option<T>, LayerError> {
        let Some((value, source)) = self.raw(key, flag, file) else {
            return Ok(None);
        };
        parse(&value).map(Some).map_err(|e| LayerError {
            key: key.to_string(),
            origin: source,
            reason: e.to_string(),
            value,
        })
    }

    /// A typed value: the flag (already typed by the flag parser), else the environment parsed with
    /// `FromStr`, else the file's (already typed by the TOML parser).
    pub fn get<T>(
        &self,
        key: &str,
        flag: Option<T>,
        file: Option<T>,
    ) -> Result<Option<T>, LayerError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        if flag.is_some() {
            return Ok(flag);
        }
        let var = self.env_var(key);
        if let Some(v) = self.env.get(&var) {
            return v.parse::<T>().map(Some).map_err(|e| LayerError {
                key: key.to_string(),
                origin: Source::Env(var),
                value: v.clone(),
                reason: e.to_string(),
            });
        }
        Ok(file)
    }

    /// The `drain_timeout` every daemon takes (default [`crate::DEFAULT_DRAIN_TIMEOUT`]).
    pub fn drain_timeout(
        &self,
        flag: Option<String>,
        file: Option<String>,
    ) -> Result<std::time::Duration, LayerError> {
        Ok(self
            .parse(
                "drain_timeout",
                flag,
                file,
                crate::runtime::parse_drain_timeout,
            )?
            .unwrap_or(crate::DEFAULT_DRAIN_TIMEOUT))
    }

    /// The log options every daemon has: `log_level` (default info) and `log_format` (default text),
    /// validated with the layer each came from.
    pub fn log_options(
        &self,
        level: (Option<String>, Option<String>),
        format: (Option<String>, Option<String>),
    ) -> Result<(String, crate::LogFormat), LayerError> {
        let reason = |e: crate::LogOptionError| match e {
            crate::LogOptionError::Level(_) => "error, warn, info, debug or trace",
            crate::LogOptionError::Format(_) => "text or json",
        };
        let level = self
            .parse("log_level", level.0, level.1, |v| {
                crate::parse_log_level(v).map_err(reason)
            })?
            .unwrap_or_else(|| "info".to_string());
        let format = self
            .parse("log_format", format.0, format.1, |v| {
                crate::parse_log_format(v).map_err(reason)
            })?
            .unwrap_or(crate::LogFormat::Text);
        Ok((level, format))
    }
}

fn env_prefix(daemon: &str) -> String {
    format!("SIGIL_{}_", daemon.to_ascii_uppercase())
}

/// The flags every daemon's `run` takes, flattened into its own flags; its file has the same
/// keys.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CommonArgs {
    /// Log level (error, warn, info, debug, trace).
    #[arg(long)]
    pub log_level: Option<String>,
    /// Log format: text or json.
    #[arg(long)]
    pub log_format: Option<String>,
    /// Bound on finishing in-flight calls (API calls, open streams) after SIGTERM (e.g. 10s,
    /// 500ms).
    #[arg(long)]
    pub drain_timeout: Option<String>,
    /// Serve Prometheus metrics at http://<address>/metrics (e.g. 127.0.0.1:9962); off when unset.
    #[arg(long)]
    pub metrics_address: Option<String>,
}

impl CommonArgs {
    /// The three keys as a daemon's file gives them.
    pub fn new(
        log_level: Option<String>,
        log_format: Option<String>,
        drain_timeout: Option<String>,
    ) -> Self {
        Self {
            log_level,
            log_format,
            drain_timeout,
            metrics_address: None,
        }
    }

    /// With the file's `metrics_address`.
    pub fn with_metrics_address(mut self, metrics_address: Option<String>) -> Self {
        self.metrics_address = metrics_address;
        self
    }
}

/// The options every daemon has, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommonOptions {
    /// Log level (default info).
    pub log_level: String,
    /// Log format (default text).
    pub log_format: crate::LogFormat,
    /// Drain bound after SIGTERM (default [`crate::DEFAULT_DRAIN_TIMEOUT`]).
    pub drain_timeout: std::time::Duration,
    /// Where `/metrics` is served (none: no listener).
    pub metrics_address: Option<std::net::SocketAddr>,
}

/// A configuration file that cannot be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file cannot be read.
    #[error("config: cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for the daemon's keys.
    #[error("config: invalid TOML in {}", path.display())]
    Toml {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
}

impl Layers {
    /// The file layer as the daemon's file type (its default when there is no file).
    pub fn read_file<T: serde::de::DeserializeOwned + Default>(
        &self,
    ) -> Result<T, ConfigFileError> {
        let Some(path) = &self.file else {
            return Ok(T::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.clone(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigFileError::Toml {
            path: path.clone(),
            source,
        })
    }

    /// The options every daemon has, from its flags and its file's values of the same keys:
    /// the log options first, then `drain_timeout`, then `metrics_address`.
    pub fn common(
        &self,
        flags: &CommonArgs,
        file: CommonArgs,
    ) -> Result<CommonOptions, LayerError> {
        let (log_level, log_format) = self.log_options(
            (flags.log_level.clone(), file.log_level),
            (flags.log_format.clone(), file.log_format),
        )?;
        let drain_timeout = self.drain_timeout(flags.drain_timeout.clone(), file.drain_timeout)?;
        let metrics_address = self.parse(
            "metrics_address",
            flags.metrics_address.clone(),
            file.metrics_address,
            crate::metrics::parse_metrics_address,
        )?;
        Ok(CommonOptions {
            log_level,
            log_format,
            drain_timeout,
            metrics_address,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(env: &[(&str, &str)]) -> Layers {
        Layers::with_env(
            "netd",
            Some(Path::new("/etc/sigil/netd.toml")),
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn flags_win_over_environment_which_wins_over_the_file() {
        let l = layers(&[("SIGIL_NETD_LOG_LEVEL", "debug"), ("SIGIL_NETD_MAX", "7")]);
        let lvl = |flag: Option<&str>, file: Option<&str>| {
            l.raw("log_level", flag.map(Into::into), file.map(Into::into))
        };
        assert_eq!(
            lvl(Some("warn"), Some("trace")),
            Some(("warn".into(), Source::Flag))
        );
        assert_eq!(
            lvl(None, Some("trace")),
            Some(("debug".into(), Source::Env("SIGIL_NETD_LOG_LEVEL".into())))
        );
        let none = layers(&[]);
        assert_eq!(
            none.raw("log_level", None, Some("trace".into())),
            Some((
                "trace".into(),
                Source::File(Some("/etc/sigil/netd.toml".into()))
            ))
        );
        assert_eq!(none.raw("log_level", None, None), None);
        assert_eq!(l.get::<u32>("max", Some(1), Some(3)), Ok(Some(1)));
        assert_eq!(l.get::<u32>("max", None, Some(3)), Ok(Some(7)));
        assert_eq!(none.get::<u32>("max", None, Some(3)), Ok(Some(3)));
        // Another daemon's variables are not read.
        let other = Layers::with_env(
            "agent",
            None,
            [("SIGIL_NETD_LOG_LEVEL".to_string(), "debug".to_string())].into(),
        );
        assert_eq!(other.raw("log_level", None, None), None);
    }

    #[test]
    fn bad_values_name_key_source_and_value() {
        let l = layers(&[("SIGIL_NETD_MAX", "many"), ("SIGIL_NETD_LOG_FORMAT", "xml")]);
        let e = l.get::<u32>("max", None, Some(3)).expect_err("env");
        assert_eq!(e.origin, Source::Env("SIGIL_NETD_MAX".into()));
        let msg = e.to_string();
        assert!(
            msg.starts_with("max: invalid value \"many\" from environment variable SIGIL_NETD_MAX"),
            "{msg}"
        );
        let e = l
            .log_options((Some("loud".into()), None), (None, None))
            .expect_err("flag");
        assert_eq!(
            e.to_string(),
            "log_level: invalid value \"loud\" from flag: error, warn, info, debug or trace"
        );
        let e = l
            .log_options((None, None), (None, Some("json".into())))
            .expect_err("env wins over the file's valid value");
        assert_eq!(
            e.to_string(),
            "log_format: invalid value \"xml\" from environment variable SIGIL_NETD_LOG_FORMAT: text or json"
        );
        let e = layers(&[])
            .log_options((None, Some("verbose".into())), (None, None))
            .expect_err("file");
        assert!(
            e.to_string().starts_with(
                "log_level: invalid value \"verbose\" from config file /etc/sigil/netd.toml"
            ),
            "{e}"
        );
        let ok = layers(&[])
            .log_options((None, Some("debug".into())), (Some("json".into()), None))
            .expect("valid");
        assert_eq!(ok, ("debug".to_string(), crate::LogFormat::Json));
        assert_eq!(
            layers(&[]).log_options((None, None), (None, None)),
            Ok(("info".to_string(), crate::LogFormat::Text))
        );
    }
}
