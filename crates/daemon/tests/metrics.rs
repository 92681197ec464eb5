//! The `/metrics` endpoint over a real socket: the registry's text for GET /metrics, 404 for other
//! paths, 405 for other methods, and `promtool check metrics` clean.

use prometheus_client::metrics::counter::Counter;
use sigil_daemon::{GaugeFn, Metrics, serve_metrics};
use sigil_test_util::metrics::{http_get, promtool_check, sample, scrape};

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_served_on_their_path_only_and_pass_promtool() {
    let m = Metrics::new();
    let c = Counter::<u64>::default();
    m.register("sigil_test", "svids_signed", "SVIDs signed", c.clone());
    m.register_collector(
        "sigil_test",
        GaugeFn::single("entries", "Registration entries", || 4.0),
    );
    let grpc = sigil_daemon::GrpcMetrics::register(&m, "sigil_test");
    grpc.observe(
        "/sigil.admin.v1.Entries/ListEntries".into(),
        0,
        std::time::Duration::from_millis(3),
    );
    c.inc_by(2);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (addr, task) =
        serve_metrics("127.0.0.1:0".parse().expect("addr"), m, stop_rx).expect("serve");
    let text = tokio::task::spawn_blocking(move || {
        let text = scrape(addr);
        // Control: other paths and methods are refused, and the answer says nothing else.
        for path in ["/", "/metrics/", "/debug/pprof", "/metrics/../etc/passwd"] {
            let (status, body) = http_get(addr, "GET", path);
            assert_eq!(status, 404, "{path}");
            assert!(!body.contains("sigil_test"), "{body}");
        }
        let (status, _) = http_get(addr, "POST", "/metrics");
        assert_eq!(status, 405);
        text
    })
    .await
    .expect("client");
    assert_eq!(sample(&text, "sigil_test_svids_signed_total", &[]), 2.0);
    assert_eq!(sample(&text, "sigil_test_entries", &[]), 4.0);
    assert_eq!(
        sample(
            &text,
            "sigil_test_grpc_requests_total",
            &[
                ("method", "/sigil.admin.v1.Entries/ListEntries"),
                ("code", "OK")
            ]
        ),
        1.0
    );
    promtool_check("a test registry", &text);
    stop_tx.send(true).expect("stop");
    tokio::time::timeout(std::time::Duration::from_secs(5), task)
        .await
        .expect("server stops")
        .expect("joined");
}
