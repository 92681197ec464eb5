//! End-to-end tests across sigil processes (see `tests/` beside this file). The library part holds the
//! minimal in-tree test agent that speaks the agent API over real TLS, as the real agent will.
#![forbid(unsafe_code)]

pub mod test_agent;

use std::path::Path;

use anyhow::Context;
use tonic::transport::{Channel, Endpoint};

/// A gRPC channel to the admin API on a Unix socket, refused if the socket (or a directory on the way)
/// belongs to a user other than root and us, as the CLI does.
pub async fn admin_channel(path: &Path) -> anyhow::Result<Channel> {
    let path = path.to_path_buf();
    let shown = path.display().to_string();
    Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = path.clone();
            async move {
                let stream = sigil_daemon::connect_trusted(&p)
                    .await
                    .map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| format!("cannot connect to the admin socket {shown}"))
}

/// Now in Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
