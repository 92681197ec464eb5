//! Handshake latency over loopback (p50/p99 of full handshakes, one at a time) and 1 000 pairs
//! authenticated ahead of time (64 at once): wall time and the process's CPU time. Real TCP,
//! real TLS 1.3, real X.509-SVIDs from a test CA. Run: `cargo bench -p sigil-mutual-auth`.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sigil_identity::NumericIdentity;
use sigil_mutual_auth::{AuthContext, Pair, authenticate, serve};
use sigil_spiffe::SpiffeId;
use sigil_spiffe::bundle::{Bundle, BundleSet};
use sigil_spiffe::id::TrustDomain;
use sigil_test_util::TestCa;
use sigil_tls::SharedBundles;

const TD: &str = "bench.test";
const LATENCY_RUNS: usize = 1000;
const PAIRS: u32 = 1000;
const CONCURRENCY: usize = 64;

/// Every identity 256.. has an SVID, and loopback hosts them all.
struct Node {
    svids: HashMap<u32, Arc<CertifiedKey>>,
    bundles: SharedBundles,
}

impl AuthContext for Node {
    fn local_svid(&self, identity: NumericIdentity) -> Option<Arc<CertifiedKey>> {
        self.svids.get(&identity.get()).cloned()
    }
    fn spiffe_id_of(&self, identity: NumericIdentity) -> Option<SpiffeId> {
        SpiffeId::parse(&format!("spiffe://{TD}/w{}", identity.get())).ok()
    }
    fn node_hosts(&self, _: IpAddr, _: NumericIdentity) -> bool {
        true
    }
    fn bundles(&self) -> SharedBundles {
        self.bundles.clone()
    }
}

/// User + system CPU time of this process so far (from /proc, in clock ticks of 10 ms).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the command name.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let ca = TestCa::spiffe(TD).unwrap();
    let mut b = Bundle::new(TrustDomain::parse(TD).unwrap());
    b.x509_authorities.push(CertificateDer::from(ca.der()));
    let mut set = BundleSet::new();
    set.insert(b);
    let bundles: SharedBundles = Arc::new(ArcSwap::from_pointee(set));
    let mut svids = HashMap::new();
    for id in 256..256 + PAIRS + 1 {
        let (cert, key) = ca
            .svid(&format!("spiffe://{TD}/w{id}"), Duration::from_secs(7200))
            .unwrap();
        let key = PrivateKeyDer::Pkcs8(key.into());
        svids.insert(
            id,
            Arc::new(sigil_tls::certified_key(vec![CertificateDer::from(cert)], &key).unwrap()),
        );
    }
    let node = Arc::new(Node { svids, bundles });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(serve(l, node.clone(), tx));
        tokio::spawn(async move { while rx.recv().await.is_some() {} });

        let pair = |i: u32| Pair {
            local: NumericIdentity::new(256 + i),
            remote: NumericIdentity::new(256 + PAIRS),
        };
        // Warm-up.
        for i in 0..10 {
            authenticate(&*node, addr, pair(i)).await.unwrap();
        }
        let mut lat = Vec::with_capacity(LATENCY_RUNS);
        for i in 0..LATENCY_RUNS {
            let start = Instant::now();
            authenticate(&*node, addr, pair(i as u32 % PAIRS))
                .await
                .unwrap();
            lat.push(start.elapsed());
        }
        lat.sort();
        println!(
            "handshake latency over loopback ({LATENCY_RUNS} sequential, client and server in one process): p50 {:?}, p99 {:?}, max {:?}",
            percentile(&lat, 0.50),
            percentile(&lat, 0.99),
            lat[lat.len() - 1]
        );

        let cpu0 = cpu_time();
        let start = Instant::now();
        let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
        let mut tasks = Vec::new();
        for i in 0..PAIRS {
            let (node, slots) = (node.clone(), slots.clone());
            tasks.push(tokio::spawn(async move {
                let _p = slots.acquire().await.unwrap();
                authenticate(&*node, addr, pair(i)).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let wall = start.elapsed();
        let cpu = cpu_time().saturating_sub(cpu0);
        println!(
            "{PAIRS} pairs pre-authenticated ({CONCURRENCY} at once): wall {wall:?}, CPU {cpu:?} (both ends)"
        );
    });
}
