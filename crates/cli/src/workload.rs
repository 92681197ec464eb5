//! Client side of the SPIFFE Workload API served by sigil-agent: where its socket is, and the calls
//! (each with the `workload.spiffe.io: true` header the agent demands).

use std::path::{Path, PathBuf};
use std::time::Duration;

use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_proto::workload::{
    self as wpb, JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest,
    X509svidRequest,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::client::{self, RpcError};

/// The environment variable SPIFFE clients read the Workload API address from.
pub const ENDPOINT_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

type Interceptor = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;

/// A Workload API client that adds the security header to every call.
pub type Client = SpiffeWorkloadApiClient<InterceptedService<Channel, Interceptor>>;

/// `--socket-path`, taken by every command that talks to the agent's Workload API.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WorkloadSocket {
    /// Path of the agent's Workload API socket [default: $SPIFFE_ENDPOINT_SOCKET, else
    /// /run/sigil/agent/public/api.sock]. It must be owned by root or by this user.
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,
}

impl WorkloadSocket {
    /// The socket to dial: the flag, else `SPIFFE_ENDPOINT_SOCKET`, else the agent's default.
    pub fn resolve(&self) -> anyhow::Result<PathBuf> {
        let env = std::env::var_os(ENDPOINT_ENV);
        let env =
            match &env {
                Some(v) => Some(v.to_str().ok_or_else(|| {
                    anyhow::anyhow!("{ENDPOINT_ENV}: the value {v:?} is not UTF-8")
                })?),
                None => None,
            };
        resolve_socket(self.socket_path.as_deref(), env).map_err(anyhow::Error::msg)
    }
}

/// Picks the socket from the flag, the environment variable's value, or the default, in that order.
pub fn resolve_socket(flag: Option<&Path>, env: Option<&str>) -> Result<PathBuf, String> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    // An empty variable is treated as unset, as the SPIFFE client libraries do.
    match env.filter(|v| !v.is_empty()) {
        Some(v) => parse_endpoint(v),
        None => Ok(PathBuf::from(sigil_agent::config::DEFAULT_SOCKET_PATH)),
    }
}

/// Parses a `SPIFFE_ENDPOINT_SOCKET` value: `unix:///abs/path` or `unix:/abs/path`; TCP and anything
/// else are refused, naming the variable and the value.
pub fn parse_endpoint(value: &str) -> Result<PathBuf, String> {
    let bad = |why: &str| {
        format!(
            "{ENDPOINT_ENV}: unsupported value {value:?}: {why} \
             (want unix:///path/to/socket or unix:/path/to/socket)"
        )
    };
    let Some(rest) = value.strip_prefix("unix:") else {
        return Err(match value.split_once(':') {
            Some((scheme, _)) if !scheme.contains('/') => bad(&format!(
                "the scheme {scheme:?} is not supported, only unix"
            )),
            _ => bad("no unix: scheme"),
        });
    };
    if rest.contains('?') || rest.contains('#') {
        return Err(bad("a query or fragment is not allowed"));
    }
    let path = match rest.strip_prefix("//") {
        // unix://host/path names a host, which a local socket cannot have.
        Some(after) if !after.is_empty() && !after.starts_with('/') => {
            return Err(bad("the authority (host) part must be empty"));
        }
        Some(after) => after,
        None => rest,
    };
    if !path.starts_with('/') {
        return Err(bad("the socket path must be absolute"));
    }
    Ok(PathBuf::from(path))
}

/// Connects to the Workload API at `socket`, failing at once if nothing listens there.
pub async fn connect(socket: &Path) -> anyhow::Result<Client> {
    let channel = client::dial(socket).await.map_err(|e| {
        e.describe(
            "Workload API",
            socket,
            "is the agent running? start it with `sigil agent run`",
        )
    })?;
    Ok(SpiffeWorkloadApiClient::with_interceptor(
        channel,
        wpb::insert_security_header as Interceptor,
    ))
}

/// Runs `call` within `timeout`, naming the socket if it takes longer.
pub async fn within<T>(
    timeout: Duration,
    socket: &Path,
    call: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(timeout, call).await.map_err(|_| {
        anyhow::anyhow!(
            "no answer from the Workload API at {} within {}",
            socket.display(),
            humantime::format_duration(timeout)
        )
    })?
}

/// The first message of the FetchX509SVID stream: the caller's SVIDs as the agent has them now.
pub async fn fetch_x509(client: &mut Client) -> anyhow::Result<wpb::X509svidResponse> {
    let mut stream = client::reply(client.fetch_x509svid(X509svidRequest {}).await)?;
    stream
        .message()
        .await
        .map_err(RpcError)?
        .ok_or_else(|| anyhow::anyhow!("the agent closed the FetchX509SVID stream without an SVID"))
}

/// The first message of the FetchX509Bundles stream.
pub async fn fetch_x509_bundles(client: &mut Client) -> anyhow::Result<wpb::X509BundlesResponse> {
    let mut stream = client::reply(client.fetch_x509_bundles(X509BundlesRequest {}).await)?;
    stream.message().await.map_err(RpcError)?.ok_or_else(|| {
        anyhow::anyhow!("the agent closed the FetchX509Bundles stream without a bundle")
    })
}

/// The first message of the FetchJWTBundles stream.
pub async fn fetch_jwt_bundles(client: &mut Client) -> anyhow::Result<wpb::JwtBundlesResponse> {
    let mut stream = client::reply(client.fetch_jwt_bundles(JwtBundlesRequest {}).await)?;
    stream.message().await.map_err(RpcError)?.ok_or_else(|| {
        anyhow::anyhow!("the agent closed the FetchJWTBundles stream without a bundle")
    })
}

/// JWT-SVIDs for `audience`: one per identity of the caller, or only `spiffe_id`'s if given.
pub async fn fetch_jwt(
    client: &mut Client,
    audience: &[String],
    spiffe_id: Option<&str>,
) -> anyhow::Result<Vec<wpb::Jwtsvid>> {
    let resp = client::reply(
        client
            .fetch_jwtsvid(JwtsvidRequest {
                audience: audience.to_vec(),
                spiffe_id: spiffe_id.unwrap_or_default().to_string(),
            })
            .await,
    )?;
    if resp.svids.is_empty() {
        anyhow::bail!("the agent returned no JWT-SVID");
    }
    Ok(resp.svids)
}

/// Asks the agent to validate `token` for `audience`; returns the SPIFFE ID and the claims.
pub async fn validate_jwt(
    client: &mut Client,
    audience: &str,
    token: &str,
) -> anyhow::Result<(String, serde_json::Value)> {
    let resp = client::reply(
        client
            .validate_jwtsvid(ValidateJwtsvidRequest {
                audience: audience.to_string(),
                svid: token.to_string(),
            })
            .await,
    )?;
    let claims = resp
        .claims
        .map_or(serde_json::Value::Null, |s| struct_to_json(&s));
    Ok((resp.spiffe_id, claims))
}

/// Whether the agent is up: it answers FetchX509Bundles with bundles or with PermissionDenied (which it
/// only sends after attesting the caller). `shallow` only checks that the socket accepts connections.
pub async fn health(socket: &Path, shallow: bool, timeout: Duration) -> anyhow::Result<()> {
    within(timeout, socket, async {
        let mut client = connect(socket).await?;
        if shallow {
            return Ok(());
        }
        match client.fetch_x509_bundles(X509BundlesRequest {}).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::PermissionDenied => Ok(()),
            Err(s) => Err(anyhow::anyhow!(
                "the Workload API at {} answered: {}",
                socket.display(),
                RpcError(s)
            )),
        }
    })
    .await
}

/// Splits concatenated DER values (the Workload API's certificate lists) into one buffer each.
pub fn split_der(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    sigil_spiffe::der::split_certificates(bytes).map_err(|e| e.to_string())
}

/// A protobuf `Struct` (ValidateJWTSVID's claims) as JSON; whole numbers come back as integers.
pub fn struct_to_json(s: &prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    use serde_json::Value;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            // JSON claims such as exp and iat are integers; the Struct carries them as doubles.
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                Value::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value_to_json).collect()),
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_takes_both_unix_forms() {
        assert_eq!(
            parse_endpoint("unix:///run/spire/api.sock"),
            Ok(PathBuf::from("/run/spire/api.sock"))
        );
        assert_eq!(
            parse_endpoint("unix:/tmp/agent.sock"),
            Ok(PathBuf::from("/tmp/agent.sock"))
        );
    }

    #[test]
    fn endpoint_refusals_name_the_variable_and_the_value() {
        let cases = [
            ("tcp://127.0.0.1:8000", "\"tcp\" is not supported"),
            ("unix://host/tmp/a.sock", "authority"),
            ("unix:relative.sock", "absolute"),
            ("unix://", "absolute"),
            ("unix:///tmp/a.sock?x=1", "query"),
            ("/tmp/a.sock", "no unix: scheme"),
            ("http://localhost/x", "\"http\" is not supported"),
        ];
        for (value, why) in cases {
            let err = parse_endpoint(value).unwrap_err();
            assert!(err.starts_with("SPIFFE_ENDPOINT_SOCKET: "), "{err}");
            assert!(err.contains(&format!("{value:?}")), "{err}");
            assert!(err.contains(why), "{value}: {err} should say {why}");
        }
    }

    #[test]
    fn socket_comes_from_flag_then_env_then_default() {
        let flag = Path::new("/flag.sock");
        assert_eq!(
            resolve_socket(Some(flag), Some("unix:///env.sock")),
            Ok(flag.to_path_buf())
        );
        assert_eq!(
            resolve_socket(None, Some("unix:///env.sock")),
            Ok(PathBuf::from("/env.sock"))
        );
        let default = PathBuf::from(sigil_agent::config::DEFAULT_SOCKET_PATH);
        assert_eq!(resolve_socket(None, None), Ok(default.clone()));
        assert_eq!(resolve_socket(None, Some("")), Ok(default));
        // A bad variable is an error even though a default exists: silently ignoring it would hide it.
        assert!(resolve_socket(None, Some("tcp://1.2.3.4:1")).is_err());
        // The flag wins over a bad variable, which then is never looked at.
        assert!(resolve_socket(Some(flag), Some("tcp://1.2.3.4:1")).is_ok());
    }

    #[test]
    fn claims_struct_becomes_json_with_integer_times() {
        use prost_types::{ListValue, Struct, Value, value::Kind};
        let v = |k| Value { kind: Some(k) };
        let s = Struct {
            fields: [
                (
                    "sub".to_string(),
                    v(Kind::StringValue("spiffe://td/w".into())),
                ),
                ("exp".to_string(), v(Kind::NumberValue(1_700_000_000.0))),
                ("x".to_string(), v(Kind::NumberValue(1.5))),
                (
                    "aud".to_string(),
                    v(Kind::ListValue(ListValue {
                        values: vec![v(Kind::StringValue("demo".into()))],
                    })),
                ),
            ]
            .into_iter()
            .collect(),
        };
        assert_eq!(
            struct_to_json(&s),
            serde_json::json!({"sub":"spiffe://td/w","exp":1_700_000_000i64,"x":1.5,"aud":["demo"]})
        );
    }

    #[tokio::test]
    async fn health_names_the_socket_when_nothing_listens() {
        let path = std::env::temp_dir().join(format!("sigil-cli-wl-{}.sock", std::process::id()));
        let err = health(&path, false, Duration::from_secs(5))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("sigil agent run"), "{err}");
    }
}
