//! Prometheus metrics every daemon shares: the `/metrics` HTTP endpoint (`metrics_address`, off
//! unless configured), a tower layer that counts gRPC calls by method and code with latency
//! histograms, and gauges read at scrape time.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::watch;

use crate::Metrics;

/// The content type of the Prometheus text format (what Hubble and `promtool` speak).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Cap on scrapes served at once; more connections wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 16;
/// Bound on one connection (reading the request, encoding, writing the answer).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Buckets of latency histograms, in seconds: 0.5 ms doubling to about 16 s.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0005, 2.0, 16)
}

/// A latency histogram with [`latency_buckets`].
pub fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// A `metrics_address` value that is not a socket address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("want an IP address and port (e.g. 127.0.0.1:9962 or [::1]:9962)")]
pub struct AddressError;

/// Parses a `metrics_address` (`IP:port`; port 0 picks a free port).
pub fn parse_metrics_address(value: &str) -> Result<SocketAddr, AddressError> {
    value.parse().map_err(|_| AddressError)
}

/// Serves `GET /metrics` of `metrics` on `addr` until `stop` turns true. Other paths get 404, other
/// methods 405; one request per connection, at most [`MAX_CONNECTIONS`] at once, each bounded by
/// [`CONNECTION_TIMEOUT`]. Returns the bound address and the server's task.
pub fn serve_metrics(
    addr: SocketAddr,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = crate::accept::bind_tcp(addr)?;
    let bound = listener.local_addr()?;
    if !bound.ip().is_loopback() {
        tracing::warn!(address = %bound, "metrics endpoint reachable from the network (no authentication; metric values only)");
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        let mut backoff = crate::accept::Backoff::default();
        loop {
            let permit = tokio::select! {
                p = Arc::clone(&slots).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = stop.wait_for(|s| *s) => return,
            };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => return,
            };
            let stream = match accepted {
                Ok((s, _)) => {
                    backoff.reset();
                    s
                }
                Err(e) => {
                    tracing::debug!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let svc = hyper::service::service_fn(move |req| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&req, &metrics)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .max_buf_size(16 * 1024)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            });
        }
    });
    Ok((bound, task))
}

fn answer<B>(
    req: &http::Request<B>,
    metrics: &Metrics,
) -> http::Response<http_body_util::Full<Bytes>> {
    let plain = |status: http::StatusCode, text: &'static str| {
        let mut r = http::Response::new(http_body_util::Full::new(Bytes::from_static(
            text.as_bytes(),
        )));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.uri().path() != "/metrics" {
        return plain(
            http::StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics\n",
        );
    }
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        let mut r = plain(http::StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        r.headers_mut().insert(
            http::header::ALLOW,
            http::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    match metrics.encode().map(|t| to_prometheus_text(&t)) {
        Ok(text) => {
            let mut r = http::Response::new(http_body_util::Full::new(Bytes::from(text)));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(CONTENT_TYPE),
            );
            r
        }
        Err(_) => plain(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed\n",
        ),
    }
}

/// The OpenMetrics text of `prometheus_client` in the Prometheus text format: a counter family is
/// named with its `_total` suffix in `# HELP` and `# TYPE` (as Hubble's Go exporter writes it), and
/// the OpenMetrics-only `# UNIT` and `# EOF` lines are left out.
pub fn to_prometheus_text(open: &str) -> String {
    let lines: Vec<&str> = open.lines().collect();
    let mut out = String::with_capacity(open.len());
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line == "# EOF" || line.starts_with("# UNIT ") {
            i += 1;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or("");
            let is_counter = lines
                .get(i + 1)
                .is_some_and(|t| *t == format!("# TYPE {name} counter"));
            if is_counter && !name.ends_with("_total") {
                out.push_str(&format!("# HELP {name}_total{}\n", &rest[name.len()..]));
                out.push_str(&format!("# TYPE {name}_total counter\n"));
                i += 2;
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
        i += 1;
    }
    out
}

/// The name Go and Prometheus exporters give a gRPC status code (`OK`, `NotFound`, ...).
pub fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "Canceled",
        2 => "Unknown",
        3 => "InvalidArgument",
        4 => "DeadlineExceeded",
        5 => "NotFound",
        6 => "AlreadyExists",
        7 => "PermissionDenied",
        8 => "ResourceExhausted",
        9 => "FailedPrecondition",
        10 => "Aborted",
        11 => "OutOfRange",
        12 => "Unimplemented",
        13 => "Internal",
        14 => "Unavailable",
        15 => "DataLoss",
        16 => "Unauthenticated",
        _ => "Unknown",
    }
}

type CallLabels = [(&'static str, Arc<str>); 2];
type MethodLabels = [(&'static str, Arc<str>); 1];

/// gRPC calls of one daemon: `<prefix>_grpc_requests_total{method,code}` and
/// `<prefix>_grpc_request_duration_seconds{method}`. The method label is the full path of a
/// method of a registered service, else `unknown` (a client cannot mint label values).
#[derive(Clone, Debug)]
pub struct GrpcMetrics {
    calls: Family<CallLabels, Counter>,
    latency: Family<MethodLabels, Histogram, fn() -> Histogram>,
}

impl GrpcMetrics {
    /// Registers the two families under `prefix` (e.g. `sigil_agent`).
    pub fn register(metrics: &Metrics, prefix: &str) -> Self {
        let calls = Family::<CallLabels, Counter>::default();
        let latency: Family<MethodLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        metrics.register(
            prefix,
            "grpc_requests",
            "gRPC calls finished, by method and status code",
            calls.clone(),
        );
        metrics.register(
            prefix,
            "grpc_request_duration_seconds",
            "Time from a gRPC call's request to the end of its response (a stream: its life), by method",
            latency.clone(),
        );
        Self { calls, latency }
    }

    /// A layer for `tonic::transport::Server::layer` that records the calls of `services` (full
    /// names, e.g. `sigil.admin.v1.Entries`).
    pub fn layer(&self, services: &[&str]) -> GrpcMetricsLayer {
        GrpcMetricsLayer {
            metrics: self.clone(),
            services: Arc::from(
                services
                    .iter()
                    .map(|s| Arc::<str>::from(*s))
                    .collect::<Vec<_>>(),
            ),
        }
    }

    /// Counts one finished call (also for callers outside the layer).
    pub fn observe(&self, method: Arc<str>, code: i32, elapsed: Duration) {
        self.calls
            .get_or_create(&[
                ("method", Arc::clone(&method)),
                ("code", code_name(code).into()),
            ])
            .inc();
        self.latency
            .get_or_create(&[("method", method)])
            .observe(elapsed.as_secs_f64());
    }
}

/// See [`GrpcMetrics::layer`].
#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer {
    metrics: GrpcMetrics,
    services: Arc<[Arc<str>]>,
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            layer: self.clone(),
        }
    }
}

impl GrpcMetricsLayer {
    /// The label of a request path: `/<service>/<method>` when the service is ours (or
    /// `grpc.health.v1.Health`) and the method
    /// a plain identifier of at most 64 characters, else `unknown`.
    fn method_label(&self, path: &str) -> Arc<str> {
        let known = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .filter(|(svc, m)| {
                !m.is_empty()
                    && m.len() <= 64
                    && m.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    && (*svc == "grpc.health.v1.Health"
                        || self.services.iter().any(|s| &**s == *svc))
            });
        match known {
            Some(_) => Arc::from(path),
            None => Arc::from("unknown"),
        }
    }
}

/// See [`GrpcMetrics::layer`].
#[derive(Clone, Debug)]
pub struct GrpcMetricsService<S> {
    inner: S,
    layer: GrpcMetricsLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let method = self.layer.method_label(req.uri().path());
        let metrics = self.layer.metrics.clone();
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut call = Call {
                metrics,
                method,
                start,
                code: None,
                done: false,
            };
            let resp = match fut.await {
                Ok(r) => r,
                Err(e) => {
                    call.code = Some(13);
                    return Err(e);
                }
            };
            // A trailers-only answer (an error before any message) carries the status in the headers.
            call.code = grpc_status(resp.headers());
            Ok(resp.map(|inner| MeteredBody { inner, call }))
        })
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// One call being measured; recorded once, when its response ends or is dropped.
struct Call {
    metrics: GrpcMetrics,
    method: Arc<str>,
    start: Instant,
    code: Option<i32>,
    done: bool,
}

impl Drop for Call {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        // No status at all: the client went away (or the server ended) before the trailers.
        let code = self.code.unwrap_or(1);
        let method = if code == 12 {
            Arc::from("unknown")
        } else {
            Arc::clone(&self.method)
        };
        self.metrics.observe(method, code, self.start.elapsed());
    }
}

/// A response body that records its call when the trailers pass (or the body is dropped).
pub struct MeteredBody<B> {
    inner: B,
    call: Call,
}

impl<B> std::fmt::Debug for MeteredBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredBody")
            .field("method", &self.call.method)
            .finish()
    }
}

impl<B> http_body::Body for MeteredBody<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref()
                    && let Some(code) = grpc_status(t)
                {
                    this.call.code = Some(code);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.call.code.get_or_insert(13);
            }
            Poll::Ready(None) => {
                // Ended without trailers and without a status in the headers: not a gRPC answer.
                this.call.code.get_or_insert(2);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Gauges read at scrape time: each is a name, a help text, an optional label name and a function
/// that returns the current values (one per label value, or one unlabelled).
pub struct GaugeFn {
    name: String,
    help: String,
    label: Option<&'static str>,
    read: GaugeRead,
}

type GaugeRead = Box<dyn Fn() -> Vec<(String, f64)> + Send + Sync>;

impl std::fmt::Debug for GaugeFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GaugeFn").field("name", &self.name).finish()
    }
}

impl GaugeFn {
    /// One unlabelled gauge `name` read by `read`.
    pub fn single(name: &str, help: &str, read: impl Fn() -> f64 + Send + Sync + 'static) -> Self {
        Self {
            name: name.to_string(),
            help: help.to_string(),
            label: None,
            read: Box::new(move || vec![(String::new(), read())]),
        }
    }

    /// A gauge family `name{label=...}` whose values `read` lists (label values from a bounded
    /// set: they are not checked here).
    pub fn labelled(
        name: &str,
        help: &str,
        label: &'static str,
        read: impl Fn() -> Vec<(String, f64)> + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.to_string(),
            help: help.to_string(),
            label: Some(label),
            read: Box::new(read),
        }
    }
}

impl prometheus_client::collector::Collector for GaugeFn {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let values = (self.read)();
        let mut m = encoder.encode_descriptor(
            &self.name,
            &self.help,
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        match self.label {
            None => {
                if let Some((_, v)) = values.into_iter().next() {
                    ConstGauge::new(v).encode(m)?;
                }
            }
            Some(label) => {
                for (lv, v) in values {
                    ConstGauge::new(v).encode(m.encode_family(&[(label, lv)])?)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_method_label_is_bounded_to_registered_services() {
        let m = Metrics::new();
        let g = GrpcMetrics::register(&m, "sigil_test");
        let l = g.layer(&["sigil.admin.v1.Entries"]);
        assert_eq!(
            &*l.method_label("/sigil.admin.v1.Entries/ListEntries"),
            "/sigil.admin.v1.Entries/ListEntries"
        );
        for hostile in [
            "/evil.Service/Method",
            "/sigil.admin.v1.Entries/",
            "/sigil.admin.v1.Entries/a\"b",
            "/sigil.admin.v1.Entries/x/y",
            "/",
            "",
        ] {
            assert_eq!(&*l.method_label(hostile), "unknown", "{hostile}");
        }
        let long = format!("/sigil.admin.v1.Entries/{}", "a".repeat(65));
        assert_eq!(&*l.method_label(&long), "unknown");
    }

    #[test]
    fn gauges_read_at_scrape_time_and_parse_addresses() {
        let m = Metrics::new();
        let n = Arc::new(std::sync::atomic::AtomicU64::new(3));
        let r = Arc::clone(&n);
        m.register_collector(
            "sigil_test",
            GaugeFn::single("entries", "entries", move || {
                r.load(std::sync::atomic::Ordering::Relaxed) as f64
            }),
        );
        m.register_collector(
            "sigil_test",
            GaugeFn::labelled("map_fill_ratio", "fill", "map", || {
                vec![("policy".to_string(), 0.5)]
            }),
        );
        let t = m.encode().expect("encode");
        assert!(t.contains("sigil_test_entries 3"), "{t}");
        n.store(5, std::sync::atomic::Ordering::Relaxed);
        let t = m.encode().expect("encode");
        assert!(t.contains("sigil_test_entries 5"), "{t}");
        assert!(
            t.contains("sigil_test_map_fill_ratio{map=\"policy\"} 0.5"),
            "{t}"
        );
        assert!(parse_metrics_address("127.0.0.1:9962").is_ok());
        assert!(parse_metrics_address("localhost:9962").is_err());
        assert!(parse_metrics_address("9962").is_err());
    }
}
