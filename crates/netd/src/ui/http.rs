//! The service map's HTTP/1.1 server: `/` (the page), `/app.js`, `/app.css`, `/api/graph`; GET and
//! HEAD only, everything else 404 (405 for other methods). Every response carries a strict
//! Content-Security-Policy (only 'self'; the page has no inline script or style), and a request
//! whose Host is not an IP literal or `localhost` with our port is refused, so a web page cannot
//! read the map through DNS rebinding. Connections are bounded in number and lifetime.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use super::{SharedGraph, lock};

/// Most connections open at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection is closed after this long, idle or not (the page polls on a new one).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Bound on reading a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The policy on every response: nothing but this origin's script, style and API.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const APP_CSS: &str = include_str!("app.css");

/// Serves until `stop`; connections still open then are closed.
pub async fn serve(
    listener: TcpListener,
    bound: SocketAddr,
    graph: SharedGraph,
    mut stop: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    let mut backoff = sigil_daemon::accept::Backoff::default();
    let mut log = sigil_daemon::accept::RateLimit::new(sigil_daemon::accept::LOG_INTERVAL);
    loop {
        // (The select's output holds a borrow of `stop`: take what happened out of it first.)
        let next = tokio::select! {
            r = listener.accept() => r.map(|(s, _)| Some(s)),
            Some(_) = conns.join_next(), if !conns.is_empty() => Ok(None),
            _ = stop.wait_for(|s| *s) => break,
        };
        let stream = match next {
            Ok(Some(s)) => {
                backoff.reset();
                s
            }
            Ok(None) => continue,
            Err(e) => {
                if let Some(held) = log.allow() {
                    tracing::warn!(error = %e, held_back = held, "service map: accept failed");
                }
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            if let Some(held) = log.allow() {
                tracing::warn!(
                    max = MAX_CONNECTIONS,
                    held_back = held,
                    "service map: too many connections; closing a new one"
                );
            }
            continue;
        };
        let graph = Arc::clone(&graph);
        conns.spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = respond(&req, bound, &graph);
                async move { Ok::<_, Infallible>(resp) }
            });
            // One request per connection: the page polls once a second, and an idle keep-alive
            // connection would hold one of the few places (and stalls headless browsers).
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
    conns.shutdown().await;
}

/// Whether `host` (a Host header) names this server by an IP literal or `localhost` and `port`.
fn host_allowed(host: Option<&HeaderValue>, port: u16) -> bool {
    let Some(a) = host
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
    else {
        return false;
    };
    let name = a.host();
    let literal = name
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .is_ok();
    (literal || name.eq_ignore_ascii_case("localhost")) && a.port_u16().unwrap_or(80) == port
}

fn response(status: StatusCode, content_type: &str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    for (k, v) in [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        h.insert(
            k,
            HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("")),
        );
    }
    r
}

fn text(status: StatusCode, msg: &'static str) -> Response<Full<Bytes>> {
    response(
        status,
        "text/plain; charset=utf-8",
        Bytes::from_static(msg.as_bytes()),
    )
}

/// The answer to `req` (the body of a HEAD answer is left out by hyper; its length stays).
fn respond<B>(req: &Request<B>, bound: SocketAddr, graph: &SharedGraph) -> Response<Full<Bytes>> {
    if !host_allowed(req.headers().get(header::HOST), bound.port()) {
        return text(
            StatusCode::FORBIDDEN,
            "host not allowed: address the service map by IP or localhost\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let (ct, body) = match req.uri().path() {
        "/" => (
            "text/html; charset=utf-8",
            Bytes::from_static(INDEX_HTML.as_bytes()),
        ),
        "/app.js" => (
            "text/javascript; charset=utf-8",
            Bytes::from_static(APP_JS.as_bytes()),
        ),
        "/app.css" => (
            "text/css; charset=utf-8",
            Bytes::from_static(APP_CSS.as_bytes()),
        ),
        "/api/graph" => {
            let view = lock(graph).view();
            match serde_json::to_vec(&view) {
                Ok(v) => ("application/json", Bytes::from(v)),
                Err(e) => {
                    tracing::warn!(error = %e, "service map: encoding the graph");
                    return text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "cannot encode the graph\n",
                    );
                }
            }
        }
        _ => return text(StatusCode::NOT_FOUND, "not found\n"),
    };
    response(StatusCode::OK, ct, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ui::Graph;
    use sigil_proto::flow as fpb;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One raw request on a new connection; the whole answer as text.
    async fn raw(addr: SocketAddr, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // A connection the server closes at once may reset: what arrived is the answer.
        let _ = s.write_all(request.as_bytes()).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    fn req(method: &str, path: &str, host: &str) -> String {
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    }

    #[tokio::test]
    async fn routes_methods_hosts_and_headers() {
        let listener = sigil_daemon::accept::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let graph: SharedGraph = Arc::new(Mutex::new(Graph::new("n1", 8)));
        lock(&graph).add(&fpb::Flow {
            source: Some(fpb::Endpoint {
                identity: 300,
                labels: vec!["k8s:app=<script>alert(1)</script>".into()],
                ..Default::default()
            }),
            destination: Some(fpb::Endpoint {
                identity: 301,
                ..Default::default()
            }),
            verdict: fpb::Verdict::Dropped as i32,
            ..Default::default()
        });
        let (stop_tx, stop) = watch::channel(false);
        let server = tokio::spawn(serve(listener, addr, Arc::clone(&graph), stop));
        let host = addr.to_string();

        let page = raw(addr, &req("GET", "/", &host)).await;
        assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
        assert!(
            page.contains(&format!("content-security-policy: {CSP}")),
            "{page}"
        );
        assert!(page.contains("x-content-type-options: nosniff"), "{page}");
        assert!(page.contains("<script src=\"/app.js\"></script>"), "{page}");
        // No inline script or style: the CSP would block it.
        assert!(
            !page.contains("<script>") && !page.contains("<style") && !page.contains(" style=")
        );

        let api = raw(addr, &req("GET", "/api/graph?x=1", &host)).await;
        assert!(api.contains("content-type: application/json"), "{api}");
        let body = api.split("\r\n\r\n").nth(1).expect("body");
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["edges"][0]["denied"], 1);
        assert_eq!(
            v["identities"][0]["labels"][0],
            "k8s:app=<script>alert(1)</script>"
        );

        for path in ["/app.js", "/app.css"] {
            assert!(
                raw(addr, &req("GET", path, &host))
                    .await
                    .starts_with("HTTP/1.1 200")
            );
        }
        let head = raw(addr, &req("HEAD", "/", &host)).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.ends_with("\r\n\r\n"),
            "a HEAD answer has no body: {head}"
        );
        assert!(
            head.contains(&format!("content-length: {}", INDEX_HTML.len())),
            "{head}"
        );

        for path in [
            "/index.html",
            "/api",
            "/api/graph/",
            "/../etc/passwd",
            "//app.js",
            "/favicon.ico",
        ] {
            let r = raw(addr, &req("GET", path, &host)).await;
            assert!(r.starts_with("HTTP/1.1 404"), "{path}: {r}");
            assert!(r.contains("content-security-policy"), "{r}");
        }
        for m in ["POST", "PUT", "DELETE", "OPTIONS", "TRACE"] {
            let r = raw(addr, &req(m, "/api/graph", &host)).await;
            assert!(r.starts_with("HTTP/1.1 405"), "{m}: {r}");
            assert!(r.contains("allow: GET, HEAD"), "{r}");
        }
        // DNS rebinding: a name the attacker controls, a wrong port, no Host at all.
        for bad in [
            "evil.example:".to_owned() + &addr.port().to_string(),
            "127.0.0.1:1".to_owned(),
            "127.0.0.1.nip.io:".to_owned() + &addr.port().to_string(),
        ] {
            let r = raw(addr, &req("GET", "/api/graph", &bad)).await;
            assert!(r.starts_with("HTTP/1.1 403"), "{bad}: {r}");
            assert!(!r.contains("edges"), "{r}");
        }
        let r = raw(addr, "GET /api/graph HTTP/1.0\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.0 403") || r.starts_with("HTTP/1.1 403"),
            "{r}"
        );
        // Controls: localhost and the IP by which it is reached.
        let local = format!("localhost:{}", addr.port());
        assert!(
            raw(addr, &req("GET", "/api/graph", &local))
                .await
                .starts_with("HTTP/1.1 200")
        );

        // Hostile bytes get an error, not a panic, and the server keeps serving.
        let r = raw(addr, "\x00\x01garbage\r\n\r\n").await;
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 400"), "{r}");
        assert!(
            raw(addr, &req("GET", "/", &host))
                .await
                .starts_with("HTTP/1.1 200")
        );

        stop_tx.send_replace(true);
        server.await.expect("server");
    }

    #[tokio::test]
    async fn connections_beyond_the_bound_are_closed_and_the_rest_are_served() {
        let listener = sigil_daemon::accept::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let graph: SharedGraph = Arc::new(Mutex::new(Graph::new("n1", 8)));
        let (stop_tx, stop) = watch::channel(false);
        let server = tokio::spawn(serve(listener, addr, graph, stop));
        // Idle connections that never send a request hold every slot.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        // The next one is closed without an answer.
        let refused = raw(addr, &req("GET", "/", &addr.to_string())).await;
        assert!(refused.is_empty(), "{refused}");
        // Once they go, the map is served again.
        drop(idle);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let r = raw(addr, &req("GET", "/", &addr.to_string())).await;
            if r.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never served again");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop_tx.send_replace(true);
        server.await.expect("server");
    }
}
