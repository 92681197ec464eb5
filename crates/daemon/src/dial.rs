//! The one way a sigil daemon reaches sigil-server's TLS listener as a gRPC client: TCP (no
//! Nagle), TLS 1.3 with the caller's rustls config (its verifier pins the server's SPIFFE ID;
//! SNI `localhost`, which SPIFFE authentication ignores), HTTP/2 over it.

use std::sync::Arc;

use rustls_pki_types::ServerName;
use tonic::transport::{Channel, Endpoint};

/// Connects `endpoint` (built by the caller with its timeouts, for `http://<addr>`) to `addr`
/// (HOST:PORT) over TLS with `cfg` (ALPN `h2` is set here).
pub async fn tls_channel(
    endpoint: Endpoint,
    addr: &str,
    mut cfg: rustls::ClientConfig,
) -> Result<Channel, tonic::transport::Error> {
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let cfg = Arc::new(cfg);
    let addr = addr.to_owned();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let cfg = cfg.clone();
            let addr = addr.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                let _ = tcp.set_nodelay(true);
                let name = ServerName::try_from("localhost")
                    .map_err(std::io::Error::other)?
                    .to_owned();
                let tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
}
