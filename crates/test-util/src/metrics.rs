//! Scraping a daemon's `/metrics` in tests: a raw HTTP/1.1 GET, the value of one sample, and
//! `promtool check metrics` on the text (skipped with a message when promtool is missing, a failure
//! under `CI=true`).

use std::io::{Read, Write};
use std::net::SocketAddr;

/// The status code and body of `GET <path>` (or another `method`) on `addr`.
pub fn http_get(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read answer");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// The text of `GET /metrics` (panics unless 200).
pub fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "GET", "/metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    body
}

/// The value of the sample `name{labels}` (`labels` as written, e.g. `verdict="FORWARDED"`, in
/// any order; empty for none), summed over the samples whose label set contains all of them.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, ls) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| ls.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
        {
            sum += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

/// Runs `promtool check metrics` on `text`; panics with promtool's complaints unless clean.
/// Without promtool it skips with a message (a failure under `CI=true`).
pub fn promtool_check(what: &str, text: &str) {
    let found = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok();
    if !crate::skip_unless(
        &format!("promtool check of {what}"),
        (!found).then(|| "promtool not installed (Debian package prometheus)".to_string()),
    ) {
        return;
    }
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics on {what} failed:\n{}{}\n--- text ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
