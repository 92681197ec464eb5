//! Whole-system figures against a private etcd: identity allocation latency (new label sets,
//! and label sets another node already allocated) and IPCache watch convergence for 10 000
//! entries. Run: `cargo bench -p sigil-kvstore --bench kvstore` (needs Debian's etcd-server).
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sigil_identity::NumericIdentity;
use sigil_kvstore::{ClusterAllocator, Config, IpCacheEvent, KvStore};
use sigil_labels::Labels;
use sigil_test_util::EtcdServer;

const ENTRIES: u32 = 10_000;
const ALLOCS: usize = 300;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

async fn store(etcd: &EtcdServer, name: &str, ip: &str) -> KvStore {
    let cfg = Config::new(vec![etcd.endpoint()], "bench", 1, name, ip.parse().unwrap());
    KvStore::connect(cfg).await.unwrap()
}

fn main() {
    if sigil_test_util::etcd::etcd_bin().is_none() {
        eprintln!("kvstore bench skipped: no etcd binary (install Debian's etcd-server)");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let etcd = EtcdServer::start().unwrap();
    rt.block_on(run(&etcd));
}

async fn run(etcd: &EtcdServer) {
    let a = store(etcd, "node-a", "192.0.2.1").await;
    let b = store(etcd, "node-b", "192.0.2.2").await;
    let alloc_a = ClusterAllocator::new(&a);
    let alloc_b = ClusterAllocator::new(&b);
    alloc_a.wait_synced().await;
    alloc_b.wait_synced().await;

    // Allocation latency, one at a time: new label sets on node-a, then the same sets on
    // node-b (reference to an existing number).
    let mut new = Vec::with_capacity(ALLOCS);
    let mut existing = Vec::with_capacity(ALLOCS);
    let sets: Vec<Labels> = (0..ALLOCS)
        .map(|i| {
            Labels::parse_list(&format!(
                "k8s:app=bench-{i},k8s:io.kubernetes.pod.namespace=ns"
            ))
            .unwrap()
        })
        .collect();
    for l in &sets {
        let t = Instant::now();
        alloc_a.allocate(l).await.unwrap();
        new.push(t.elapsed());
    }
    for l in &sets {
        let t = Instant::now();
        alloc_b.allocate(l).await.unwrap();
        existing.push(t.elapsed());
    }
    println!(
        "identity allocate, new label set:      n={ALLOCS} p50={:?} p99={:?}",
        pct(&mut new, 0.5),
        pct(&mut new, 0.99)
    );
    println!(
        "identity allocate, existing (2nd node): n={ALLOCS} p50={:?} p99={:?}",
        pct(&mut existing, 0.5),
        pct(&mut existing, 0.99)
    );

    // IPCache: node-a publishes 10 000 entries (64 in flight) while node-b watches.
    let mut w = b.watch_ipcache();
    loop {
        if let Some(IpCacheEvent::Synced) = w.next().await {
            break;
        }
    }
    let id = NumericIdentity::new((1 << 16) | 300);
    let a = Arc::new(a);
    let start = Instant::now();
    let publisher = {
        let a = Arc::clone(&a);
        tokio::spawn(async move {
            let sem = Arc::new(tokio::sync::Semaphore::new(64));
            let mut tasks = Vec::new();
            for i in 0..ENTRIES {
                let permit = Arc::clone(&sem).acquire_owned().await.unwrap();
                let a = Arc::clone(&a);
                tasks.push(tokio::spawn(async move {
                    let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i));
                    a.publish_endpoint(ip, id).await.unwrap();
                    drop(permit);
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            Instant::now()
        })
    };
    let mut seen = HashSet::new();
    while seen.len() < ENTRIES as usize {
        if let Some(IpCacheEvent::Upsert(e)) = w.next().await {
            seen.insert(e.ip);
        }
    }
    let converged = start.elapsed();
    let published = publisher.await.unwrap().duration_since(start);
    println!(
        "ipcache: {ENTRIES} entries published in {published:?} ({:.0} writes/s); remote watch converged after {converged:?}",
        f64::from(ENTRIES) / published.as_secs_f64()
    );

    // One endpoint at a time: published on node-a → seen in node-b's stream.
    let mut lat = Vec::new();
    for i in 0..200u32 {
        let ip = IpAddr::V4(Ipv4Addr::from(0x0b00_0000 | i));
        let t = Instant::now();
        a.publish_endpoint(ip, id).await.unwrap();
        loop {
            if let Some(IpCacheEvent::Upsert(e)) = w.next().await
                && e.ip == ip
            {
                break;
            }
        }
        lat.push(t.elapsed());
    }
    println!(
        "ipcache: publish on node-a → event on node-b: n=200 p50={:?} p99={:?}",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );

    // A third node starting cold: list + watch of 10 000 entries until Synced.
    let c = store(etcd, "node-c", "192.0.2.3").await;
    let t = Instant::now();
    let mut w = c.watch_ipcache();
    let mut n = 0;
    loop {
        match w.next().await {
            Some(IpCacheEvent::Upsert(_)) => n += 1,
            Some(IpCacheEvent::Synced) => break,
            _ => {}
        }
    }
    println!(
        "ipcache: cold start of a new watcher, {n} entries listed and synced in {:?}",
        t.elapsed()
    );
}
