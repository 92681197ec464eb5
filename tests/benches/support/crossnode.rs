//! What the cross-node benches share (`cluster`, `encryption`): environment knobs, percentiles,
//! iperf3 throughput and 1-byte request/response latency between namespaces, helper processes.
//! Included by each bench with `#[path]`; not a bench of its own.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use sigil_netlink::command_in_netns;
use sigil_test_util::netns::in_netns;

pub type Res<T> = anyhow::Result<T>;

pub fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or(serde_json::Value::Null)
}

/// Helper processes (iperf3 servers, boringtun), killed and reaped on drop.
pub struct Kids(pub Vec<std::process::Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn iperf(client_ns: &Path, server_ip: Ipv4Addr, secs: usize) -> Res<f64> {
    let out = command_in_netns(client_ns, "iperf3")
        .args(["-c", &server_ip.to_string(), "-t", &secs.to_string(), "-J"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "iperf3 to {server_ip}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&String::from_utf8_lossy(&out.stdout));
    Ok(v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9)
}

pub fn rr(client_ns: &Path, to: SocketAddr, n: usize) -> Res<Vec<Duration>> {
    in_netns(client_ns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut v = Vec::with_capacity(n);
        let mut b = [0u8; 1];
        for _ in 0..n {
            let t = Instant::now();
            s.write_all(b"x")?;
            s.read_exact(&mut b)?;
            v.push(t.elapsed());
        }
        v.sort();
        Ok(v)
    })
}

pub fn echo_server(ns: &Path, ip: Ipv4Addr) -> Res<()> {
    let l = in_netns(ns, move || Ok(TcpListener::bind((ip, 7000))?))?;
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let _ = c.set_nodelay(true);
                let mut b = [0u8; 1];
                while c.read_exact(&mut b).is_ok() && c.write_all(&b).is_ok() {}
            });
        }
    });
    Ok(())
}

pub fn iperf_server(kids: &mut Kids, ns: &Path) -> Res<()> {
    kids.0.push(
        command_in_netns(ns, "iperf3")
            .args(["-s", "-p", "5201"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    Ok(())
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
