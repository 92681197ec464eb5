//! Connection to sigil-server's admin API (gRPC over a Unix socket) and the errors it reports.

use std::fmt;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// `--admin-socket`, taken by every command that talks to the server.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminSocket {
    /// Path of the server's admin API socket.
    #[arg(id = "admin_socket", long = "admin-socket", value_name = "PATH", env = "SIGIL_ADMIN_SOCKET",
          default_value = sigil_server::config::DEFAULT_ADMIN_SOCKET)]
    pub path: PathBuf,
}

impl AdminSocket {
    /// Connects to the socket.
    pub async fn connect(&self) -> anyhow::Result<Channel> {
        connect(&self.path).await
    }
}

/// Opens a gRPC channel over the Unix socket at `socket`, failing at once if nothing listens there.
pub async fn connect(socket: &Path) -> anyhow::Result<Channel> {
    dial(socket).await.map_err(|e| {
        e.describe(
            "admin",
            socket,
            "is the server running? start it with `sigil server run`",
        )
    })
}

/// Why a Unix socket could not be dialled.
#[derive(Debug)]
pub enum DialError {
    /// The socket, or a directory on the way, belongs to another user: not even tried.
    Untrusted(String),
    /// Connecting failed (the innermost cause).
    Unreachable(String),
}

impl DialError {
    /// The error for the user: which socket (`kind`), why, and for an unreachable one `hint`.
    pub fn describe(self, kind: &str, socket: &Path, hint: &str) -> anyhow::Error {
        match self {
            DialError::Untrusted(cause) => {
                anyhow::anyhow!(
                    "will not use the {kind} socket {}: {cause}",
                    socket.display()
                )
            }
            DialError::Unreachable(cause) => anyhow::anyhow!(
                "cannot connect to the {kind} socket {}: {cause} ({hint})",
                socket.display()
            ),
        }
    }
}

/// Opens a gRPC channel over a Unix socket; the error is the innermost cause, for the caller to word.
///
/// The socket must belong to root or to this user, behind directories only they can change
/// ([`sigil_daemon::check_socket`]), and once connected the process serving it must run as root or
/// as this user (`SO_PEERCRED`, [`sigil_daemon::check_peer`]): a socket planted by another user could
/// be a relay serving identities from another CA. Both checks are repeated on every (re)connection.
pub async fn dial(socket: &Path) -> Result<Channel, DialError> {
    let path = socket.to_path_buf();
    // The URI only satisfies tonic's builder: the connector below dials the socket whatever it says.
    let endpoint = Endpoint::from_static("http://[::]:50051");
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(connect_unix(&path).await?)) }
        }))
        .await
        .map_err(|e| match untrusted(&e) {
            Some(cause) => DialError::Untrusted(cause),
            None => DialError::Unreachable(root_cause(&e)),
        })
}

/// The connector of [`dial`]: path check, `connect`, peer-credential check. A refusal travels as an
/// `io::Error` wrapping the [`sigil_daemon::DirError`], so that [`dial`] can tell it from a failure to
/// connect.
pub async fn connect_unix(path: &Path) -> std::io::Result<UnixStream> {
    sigil_daemon::connect_trusted(path)
        .await
        .map_err(|e| match e {
            sigil_daemon::DirError::Io { error, .. } => error,
            e => std::io::Error::other(e),
        })
}

/// The refusal of a socket by [`connect_unix`] somewhere in `e`'s chain, as its message.
fn untrusted(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(d) = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|i| i.downcast_ref::<sigil_daemon::DirError>())
        {
            return Some(d.to_string());
        }
        cur = c.source();
    }
    None
}

/// The innermost error: tonic's own layers only say "transport error".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// A gRPC call that the server refused, shown as its message followed by its code.
#[derive(Debug)]
pub struct RpcError(pub tonic::Status);

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = self.0.code();
        if self.0.message().is_empty() {
            write!(f, "{code:?}")
        } else {
            write!(f, "{} ({code:?})", self.0.message())
        }
    }
}

impl std::error::Error for RpcError {}

/// Unwraps a gRPC response, turning a refusal into an [`RpcError`].
pub fn reply<T>(r: Result<tonic::Response<T>, tonic::Status>) -> anyhow::Result<T> {
    r.map(tonic::Response::into_inner)
        .map_err(|s| RpcError(s).into())
}

/// Asks the standard gRPC health service (`grpc.health.v1.Health/Check`) about `service` (empty:
/// the daemon as a whole); an error unless the answer is `SERVING`.
pub async fn serving(channel: Channel, service: &str) -> anyhow::Result<()> {
    use sigil_proto::grpc::health::v1 as health;
    use sigil_proto::grpc::health::v1::health_check_response::ServingStatus;
    let r = reply(
        health::health_client::HealthClient::new(channel)
            .check(health::HealthCheckRequest {
                service: service.to_owned(),
            })
            .await,
    )?;
    match ServingStatus::try_from(r.status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(other) => anyhow::bail!("health: {}", other.as_str_name()),
        Err(_) => anyhow::bail!("health: unknown status {}", r.status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connection_failure_names_the_socket_and_the_fix() {
        let path = std::env::temp_dir().join(format!("sigil-cli-test-{}.sock", std::process::id()));
        let err = connect(&path)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("sigil server run"), "{err}");
        assert!(err.contains("No such file"), "{err}");
    }

    #[test]
    fn rpc_error_shows_message_and_code() {
        let e = RpcError(tonic::Status::invalid_argument(
            "spiffe_id: invalid value \"x\"",
        ));
        assert_eq!(
            e.to_string(),
            "spiffe_id: invalid value \"x\" (InvalidArgument)"
        );
    }
}
