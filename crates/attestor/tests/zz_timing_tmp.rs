#![allow(clippy::unwrap_used)]
use sigil_attestor::{PeerIdentity, UnixAttestor, WorkloadAttestor};
use std::time::Instant;
#[test]
fn timing() {
    let me = PeerIdentity::from_pid(std::process::id() as i32).unwrap();
    let exe = std::env::current_exe().unwrap();
    println!("exe size {}", std::fs::metadata(&exe).unwrap().len());
    std::thread::sleep(std::time::Duration::from_secs(4));
    let n = 5;
    let t = Instant::now();
    for _ in 0..n {
        UnixAttestor::default()
            .with_max_hash_bytes(1 << 30)
            .attest(&me)
            .unwrap();
    }
    println!("uncached: {:?}/attest", t.elapsed() / n);
    let a = UnixAttestor::default().with_max_hash_bytes(1 << 30);
    a.attest(&me).unwrap();
    let n = 2000;
    let t = Instant::now();
    for _ in 0..n {
        a.attest(&me).unwrap();
    }
    println!("cached: {:?}/attest {:?}", t.elapsed() / n, a.cache_stats());
    let mut v: Vec<_> = (0..2000)
        .map(|_| {
            let t = Instant::now();
            a.attest(&me).unwrap();
            t.elapsed()
        })
        .collect();
    v.sort();
    println!(
        "cached p50 {:?} p99 {:?} max {:?}",
        v[1000], v[1980], v[1999]
    );
}
