//! sigil-kvstore against a real etcd (one private etcd per test): cluster-wide identity
//! allocation and GC, the node registry and pod CIDR leases, IPCache sync, lease expiry and
//! loss, etcd restarts, and forged entries written straight into etcd.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use etcd_client::{Client, GetOptions};
use sigil_identity::NumericIdentity;
use sigil_kvstore::{
    Cidr, ClusterAllocator, Config, IdentityEvent, IpCacheEvent, KvError, KvStore, NodeEvent,
    NodeInfo, Watch,
};
use sigil_labels::{Label, Labels, Source};
use sigil_test_util::{EtcdServer, can_run_etcd};

const CLUSTER_ID: u8 = 3;

async fn etcd(what: &str) -> Option<EtcdServer> {
    if !can_run_etcd(what) {
        return None;
    }
    Some(
        tokio::task::spawn_blocking(EtcdServer::start)
            .await
            .unwrap()
            .unwrap(),
    )
}

fn config(etcd: &EtcdServer, node: &str, ip: &str) -> Config {
    let mut cfg = Config::new(
        vec![etcd.endpoint()],
        "test",
        CLUSTER_ID,
        node,
        ip.parse().unwrap(),
    );
    cfg.lease_ttl = Duration::from_secs(2);
    cfg.request_timeout = Duration::from_secs(2);
    cfg
}

async fn node(etcd: &EtcdServer, name: &str, ip: &str) -> KvStore {
    KvStore::connect(config(etcd, name, ip)).await.unwrap()
}

async fn raw(etcd: &EtcdServer) -> Client {
    Client::connect([etcd.endpoint()], None).await.unwrap()
}

fn labels(s: &str) -> Labels {
    Labels::parse_list(s).unwrap()
}

/// Polls `f` every 50 ms until it is true or `limit` passes; returns the time it took.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut f: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("{what}: not true after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads events until `pred` holds for one, or fails after `limit`.
async fn next_matching<T: std::fmt::Debug>(
    w: &mut Watch<T>,
    limit: Duration,
    mut pred: impl FnMut(&T) -> bool,
) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let ev = tokio::time::timeout_at(deadline, w.next())
            .await
            .context("no matching event in time")?
            .context("watch ended")?;
        if pred(&ev) {
            return Ok(ev);
        }
    }
}

/// Applies IPCache events to a map until `done` holds for it; returns how many `Synced` came.
async fn ipcache_until(
    w: &mut Watch<IpCacheEvent>,
    map: &mut BTreeMap<IpAddr, (NumericIdentity, IpAddr)>,
    limit: Duration,
    mut done: impl FnMut(&BTreeMap<IpAddr, (NumericIdentity, IpAddr)>) -> bool,
) -> anyhow::Result<usize> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut synced = 0;
    while !done(map) {
        let ev = tokio::time::timeout_at(deadline, w.next())
            .await
            .with_context(|| format!("IPCache not as expected in time: {map:?}"))?
            .context("watch ended")?;
        match ev {
            IpCacheEvent::Upsert(e) => {
                map.insert(e.ip, (e.identity, e.host_ip));
            }
            IpCacheEvent::Delete(ip) => {
                map.remove(&ip);
            }
            IpCacheEvent::Synced => synced += 1,
        }
    }
    Ok(synced)
}

/// Every id key and labels key in etcd: checks they form a bijection and returns it.
async fn etcd_identities(c: &mut Client) -> anyhow::Result<BTreeMap<u32, String>> {
    let ids = c
        .get(
            "sigil/test/identities/id/",
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    // Both ranges at one revision: a GC pass between two plain reads would look like a torn
    // pair (it deletes both keys in one transaction).
    let rev = ids.header().map_or(0, |h| h.revision());
    let by_labels = c
        .get(
            "sigil/test/identities/labels/",
            Some(GetOptions::new().with_prefix().with_revision(rev)),
        )
        .await?;
    let mut out = BTreeMap::new();
    for kv in ids.kvs() {
        let n: u32 = kv.key_str()?.rsplit('/').next().unwrap().parse()?;
        out.insert(n, kv.value_str()?.to_owned());
    }
    let mut seen = HashSet::new();
    for kv in by_labels.kvs() {
        let n: u32 = kv.value_str()?.parse()?;
        assert!(
            out.contains_key(&n),
            "labels key {} → missing id {n}",
            kv.key_str()?
        );
        assert!(seen.insert(n), "two labels keys point to {n}");
    }
    assert_eq!(
        seen.len(),
        out.len(),
        "id keys without labels keys: {out:?}"
    );
    let distinct: HashSet<_> = out.values().collect();
    assert_eq!(
        distinct.len(),
        out.len(),
        "one label set has two numbers: {out:?}"
    );
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_same_labels_on_three_nodes_get_one_number_different_labels_different() {
    let Some(etcd) = etcd("identity allocation test").await else {
        return;
    };
    let mut allocs = Vec::new();
    for (i, name) in ["node-a", "node-b", "node-c"].iter().enumerate() {
        let s = node(&etcd, name, &format!("192.0.2.{}", i + 1)).await;
        allocs.push(Arc::new(ClusterAllocator::new(&s)));
    }
    // The same label set from three nodes at once: one number.
    let web = labels("k8s:app=web,k8s:io.kubernetes.pod.namespace=prod");
    let got = futures_join(allocs.iter().map(|a| {
        let a = Arc::clone(a);
        let l = web.clone();
        async move { a.allocate(&l).await.unwrap() }
    }))
    .await;
    assert!(
        got.iter().all(|(id, first)| *id == got[0].0 && *first),
        "{got:?}"
    );
    let id = got[0].0;
    assert_eq!(id.cluster_id(), CLUSTER_ID);
    assert!((256..=65535).contains(&(id.get() & 0xffff)), "{id}");

    // 30 label sets, each allocated by every node from concurrent tasks.
    let mut tasks = Vec::new();
    for a in &allocs {
        for i in 0..30 {
            let a = Arc::clone(a);
            tasks.push(tokio::spawn(async move {
                let l = labels(&format!("k8s:app=svc-{i}"));
                (i, a.allocate(&l).await.unwrap().0)
            }));
        }
    }
    let mut by_set: HashMap<u32, HashSet<NumericIdentity>> = HashMap::new();
    for t in tasks {
        let (i, id) = t.await.unwrap();
        by_set.entry(i).or_default().insert(id);
    }
    let numbers: HashSet<_> = by_set.values().flatten().copied().collect();
    assert!(
        by_set.values().all(|s| s.len() == 1),
        "a set got two numbers: {by_set:?}"
    );
    assert_eq!(
        numbers.len(),
        30,
        "different sets share a number: {by_set:?}"
    );
    assert!(!numbers.contains(&id));
    let stored = etcd_identities(&mut raw(&etcd).await).await.unwrap();
    assert_eq!(stored.len(), 31);
    assert_eq!(stored[&id.get()], web.sorted_string());
    // Every node's cache (fed by its watch) converges on the same view.
    for a in &allocs {
        eventually(Duration::from_secs(5), "caches converge", || async {
            a.list().len() == 31
        })
        .await
        .unwrap();
        assert_eq!(a.lookup(id), Some(web.clone()));
        assert_eq!(a.lookup_by_labels(&web), Some(id));
    }
}

async fn futures_join<F: Future + Send + 'static>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_contention_in_a_narrow_range_never_gives_two_numbers_or_two_sets() {
    let Some(etcd) = etcd("identity contention test").await else {
        return;
    };
    // Ten numbers, ten label sets, three nodes racing with ten tasks each.
    let mut allocs = Vec::new();
    for (i, name) in ["node-a", "node-b", "node-c"].iter().enumerate() {
        let s = node(&etcd, name, &format!("192.0.2.{}", i + 1)).await;
        allocs.push(Arc::new(
            ClusterAllocator::with_range(&s, 256, 265).unwrap(),
        ));
    }
    let mut tasks = Vec::new();
    for a in &allocs {
        for i in 0..10 {
            let a = Arc::clone(a);
            tasks.push(tokio::spawn(async move {
                let l = labels(&format!("k8s:app=x{i}"));
                (i, a.allocate(&l).await.unwrap().0.get())
            }));
        }
    }
    let mut by_set: BTreeMap<u32, HashSet<u32>> = BTreeMap::new();
    for t in tasks {
        let (i, n) = t.await.unwrap();
        by_set.entry(i).or_default().insert(n);
    }
    let stored = etcd_identities(&mut raw(&etcd).await).await.unwrap();
    assert_eq!(stored.len(), 10, "{stored:?}");
    for (i, ns) in &by_set {
        assert_eq!(ns.len(), 1, "set {i} got {ns:?}");
        let n = *ns.iter().next().unwrap();
        assert_eq!(stored[&n], format!("k8s:app=x{i}"));
    }
    // The range is full: an eleventh set fails, naming the range and the labels.
    let e = allocs[0]
        .allocate(&labels("k8s:app=x10"))
        .await
        .unwrap_err();
    assert!(matches!(e, KvError::Exhausted { .. }), "{e}");
    let base = u32::from(CLUSTER_ID) << 16;
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("{}..={}", base | 256, base | 265)) && msg.contains("k8s:app=x10"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_references_keep_it_and_gc_frees_it_after_the_grace_period() {
    let Some(etcd) = etcd("identity GC test").await else {
        return;
    };
    let a = ClusterAllocator::new(&node(&etcd, "node-a", "192.0.2.1").await);
    let b = ClusterAllocator::new(&node(&etcd, "node-b", "192.0.2.2").await);
    let l = labels("k8s:app=db");
    let (id, _) = a.allocate(&l).await.unwrap();
    assert_eq!(b.allocate(&l).await.unwrap(), (id, true));
    assert_eq!(
        b.allocate(&l).await.unwrap(),
        (id, false),
        "second local reference"
    );
    // Long enough that a loaded machine (the whole suite on 2 cores) cannot stall the second
    // pass past it.
    let grace = Duration::from_secs(2);

    // a releases: b still references it, so GC marks nothing.
    assert!(a.release(id).await.unwrap());
    assert_eq!(a.gc(Duration::ZERO).await.unwrap().marked, 0);
    // b drops one of its two references: still referenced.
    assert!(!b.release(id).await.unwrap());
    assert_eq!(a.gc(Duration::ZERO).await.unwrap().marked, 0);
    assert!(b.release(id).await.unwrap());
    assert!(matches!(
        b.release(id).await,
        Err(KvError::NotAllocated { .. })
    ));

    // Unreferenced now: first pass marks, a pass within the grace period deletes nothing.
    let before_mark = Instant::now();
    let r = a.gc(grace).await.unwrap();
    assert_eq!((r.marked, r.deleted), (1, 0));
    assert_eq!(a.gc(grace).await.unwrap().deleted, 0);
    assert!(
        b.lookup(id).is_some(),
        "still known during the grace period"
    );
    let mut ev = b.subscribe();
    eventually(
        Duration::from_secs(15),
        "GC deletes after grace",
        || async { a.gc(grace).await.unwrap().deleted == 1 },
    )
    .await
    .unwrap();
    let took = before_mark.elapsed();
    assert!(
        took >= grace,
        "deleted {took:?} after marking, within the grace period"
    );
    assert!(
        etcd_identities(&mut raw(&etcd).await)
            .await
            .unwrap()
            .is_empty()
    );
    // Other nodes hear of it through their watch.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let e = tokio::time::timeout_at(deadline, ev.recv())
            .await
            .unwrap()
            .unwrap();
        if e == IdentityEvent::Delete(id) {
            break;
        }
    }
    assert_eq!(b.lookup(id), None);
    assert_eq!(b.lookup_by_labels(&l), None);
    // The labels can be allocated again.
    assert!(b.allocate(&l).await.unwrap().1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_gc_loses_to_a_reference_taken_after_marking() {
    let Some(etcd) = etcd("identity GC race test").await else {
        return;
    };
    let a = ClusterAllocator::new(&node(&etcd, "node-a", "192.0.2.1").await);
    let b = ClusterAllocator::new(&node(&etcd, "node-b", "192.0.2.2").await);
    let l = labels("k8s:app=cache");
    let (id, _) = a.allocate(&l).await.unwrap();
    a.release(id).await.unwrap();
    assert_eq!(a.gc(Duration::ZERO).await.unwrap().marked, 1);
    // b takes a reference after the mark: the delete transaction must fail its check.
    assert_eq!(b.allocate(&l).await.unwrap().0, id);
    assert_eq!(a.gc(Duration::ZERO).await.unwrap().deleted, 0);
    assert_eq!(a.gc(Duration::ZERO).await.unwrap().deleted, 0);
    assert_eq!(
        etcd_identities(&mut raw(&etcd).await).await.unwrap().len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_gc_is_not_fooled_by_a_label_set_that_extends_another() {
    let Some(etcd) = etcd("identity GC prefix test").await else {
        return;
    };
    // "k8s:app=a" is a text prefix of "k8s:app=a/b": a reference of the second must not count
    // for the first (reference keys hold the label set encoded, without '/').
    let a = ClusterAllocator::new(&node(&etcd, "node-a", "192.0.2.1").await);
    let (short, _) = a.allocate(&labels("k8s:app=a")).await.unwrap();
    let (long, _) = a.allocate(&labels("k8s:app=a/b")).await.unwrap();
    assert_ne!(short, long);
    a.release(short).await.unwrap();
    assert_eq!(a.gc(Duration::ZERO).await.unwrap().marked, 1);
    assert_eq!(a.gc(Duration::ZERO).await.unwrap().deleted, 1);
    let left = etcd_identities(&mut raw(&etcd).await).await.unwrap();
    assert_eq!(left.keys().copied().collect::<Vec<_>>(), vec![long.get()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_invalid_input_is_refused_naming_the_field_and_value() {
    let Some(etcd) = etcd("identity validation test").await else {
        return;
    };
    let s = node(&etcd, "node-a", "192.0.2.1").await;
    let a = ClusterAllocator::new(&s);
    let bad_value: Labels = [Label::new(Source::K8s, "app", "a;k8s:x=y")]
        .into_iter()
        .collect();
    let any: Labels = [Label::new(Source::Any, "app", "web")]
        .into_iter()
        .collect();
    let cases: Vec<(Labels, &str)> = vec![
        (Labels::new(), "empty label set"),
        (labels("reserved:host"), "reserved labels"),
        (labels("k8s:app=web,reserved:world"), "reserved labels"),
        (labels("cidr:10.0.0.0/8"), "CIDR identities are node-local"),
        (bad_value, "not valid label syntax"),
        (any, "source 'any'"),
    ];
    for (l, why) in cases {
        let e = a.allocate(&l).await.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("invalid labels {:?}", l.sorted_string())) && e.contains(why),
            "{e}"
        );
    }
    assert!(
        etcd_identities(&mut raw(&etcd).await)
            .await
            .unwrap()
            .is_empty()
    );
    for (id, range) in [
        (5, true),
        (70000, true),
        ((7 << 16) | 300, true),
        (1 << 24 | 300, true),
        ((u32::from(CLUSTER_ID) << 16) | 300, false),
    ] {
        let e = a.release(NumericIdentity::new(id)).await.unwrap_err();
        if range {
            assert!(
                e.to_string().starts_with(&format!(
                    "invalid identity \"{id}\": not in this cluster's range"
                )),
                "{e}"
            );
        } else {
            assert_eq!(
                e.to_string(),
                format!("identity {id} is not allocated on this node")
            );
        }
    }
    let e = ClusterAllocator::with_range(&s, 100, 300)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("invalid identity_range \"100..=300\""), "{e}");
    let e = s
        .publish_endpoint("10.0.0.1".parse().unwrap(), NumericIdentity::HOST)
        .await;
    assert!(
        e.unwrap_err()
            .to_string()
            .starts_with("invalid identity \"1\"")
    );
    let e = s
        .lease_pod_cidr("10.0.0.0/16".parse().unwrap(), 8)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("invalid pod_cidr_prefix_len \"8\""),
        "{e}"
    );

    // Config: each bad field is named with its value.
    let good = config(&etcd, "node-a", "192.0.2.1");
    let mut cases: Vec<(Config, &str)> = Vec::new();
    let mut c = good.clone();
    c.cluster_name = "Prod/East".into();
    cases.push((c, "invalid cluster_name \"Prod/East\""));
    let mut c = good.clone();
    c.node_name = "../x".into();
    cases.push((c, "invalid node_name \"../x\""));
    let mut c = good.clone();
    c.endpoints = vec!["127.0.0.1:2379".into()];
    cases.push((c, "invalid endpoints \"127.0.0.1:2379\""));
    let mut c = good.clone();
    c.node_ip = "0.0.0.0".parse().unwrap();
    cases.push((c, "invalid node_ip \"0.0.0.0\""));
    let mut c = good;
    c.lease_ttl = Duration::from_millis(500);
    cases.push((c, "invalid lease_ttl \"500ms\""));
    for (c, want) in cases {
        let e = KvStore::connect(c).await.unwrap_err().to_string();
        assert!(e.starts_with(want), "{e} (wanted {want})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_registry_and_ipcache_follow_nodes_and_a_dead_node_disappears_within_its_ttl() {
    let Some(etcd) = etcd("node registry test").await else {
        return;
    };
    let a = node(&etcd, "node-a", "192.0.2.1").await;
    let b = node(&etcd, "node-b", "192.0.2.2").await;
    let alloc_a = ClusterAllocator::new(&a);
    let (web, _) = alloc_a.allocate(&labels("k8s:app=web")).await.unwrap();
    let info = NodeInfo {
        name: "node-a".into(),
        ip: "192.0.2.1".parse().unwrap(),
        pod_cidr_v4: Some("10.1.0.0/24".parse().unwrap()),
        pod_cidr_v6: Some("fd00:1::/64".parse().unwrap()),
        spiffe_id: Some(sigil_spiffe::SpiffeId::parse("spiffe://example.org/node/a").unwrap()),
        carrier_id: None,
    };
    a.publish_node(&info).await.unwrap();
    let eps: Vec<IpAddr> = (1..=5)
        .map(|i| format!("10.1.0.{i}").parse().unwrap())
        .collect();
    for ip in &eps {
        a.publish_endpoint(*ip, web).await.unwrap();
    }
    // b's own endpoint is not in b's stream.
    let own: IpAddr = "10.2.0.1".parse().unwrap();
    b.publish_endpoint(own, web).await.unwrap();

    let mut nodes = b.watch_nodes();
    let mut ipc = b.watch_ipcache();
    let ev = next_matching(&mut nodes, Duration::from_secs(5), |e| {
        matches!(e, NodeEvent::Upsert(_))
    })
    .await
    .unwrap();
    assert_eq!(ev, NodeEvent::Upsert(info.clone()));
    let mut map = BTreeMap::new();
    ipcache_until(&mut ipc, &mut map, Duration::from_secs(5), |m| m.len() == 5)
        .await
        .unwrap();
    assert!(!map.contains_key(&own), "own entry in own stream: {map:?}");
    let host: IpAddr = "192.0.2.1".parse().unwrap();
    assert!(map.values().all(|v| *v == (web, host)), "{map:?}");
    assert_eq!(b.list_nodes().await.unwrap(), vec![info]);

    // Withdraw one: b sees the delete.
    a.withdraw_endpoint(eps[0]).await.unwrap();
    ipcache_until(&mut ipc, &mut map, Duration::from_secs(5), |m| m.len() == 4)
        .await
        .unwrap();

    // node-a dies (no goodbye): its node entry, IPCache entries and identity reference go
    // within the 2 s TTL (plus one keep-alive period of slack).
    drop(alloc_a);
    drop(a);
    let start = Instant::now();
    ipcache_until(&mut ipc, &mut map, Duration::from_secs(6), |m| m.is_empty())
        .await
        .unwrap();
    next_matching(&mut nodes, Duration::from_secs(6), |e| {
        *e == NodeEvent::Delete("node-a".into())
    })
    .await
    .unwrap();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(b.list_nodes().await.unwrap().is_empty());
    let refs = raw(&etcd)
        .await
        .get(
            "sigil/test/identities/value/",
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(
        refs.kvs().len(),
        0,
        "the dead node's identity reference is gone"
    );
    // b's own entry stays.
    let mut c = raw(&etcd).await;
    assert_eq!(
        c.get("sigil/test/ipcache/10.2.0.1", None)
            .await
            .unwrap()
            .kvs()
            .len(),
        1
    );
    // A graceful close removes everything at once.
    b.close().await.unwrap();
    assert_eq!(
        c.get("sigil/test/ipcache/10.2.0.1", None)
            .await
            .unwrap()
            .kvs()
            .len(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_pod_cidr_leases_are_unique_and_freed_with_the_lease() {
    let Some(etcd) = etcd("pod CIDR lease test").await else {
        return;
    };
    let cluster: Cidr = "10.8.0.0/22".parse().unwrap();
    let mut stores = Vec::new();
    for i in 0..5 {
        stores.push(node(&etcd, &format!("node-{i}"), &format!("192.0.2.{}", i + 1)).await);
    }
    let got = futures_join(stores[..4].iter().map(|s| {
        let s = s.clone();
        async move { s.lease_pod_cidr(cluster, 24).await.unwrap() }
    }))
    .await;
    let distinct: HashSet<_> = got.iter().collect();
    assert_eq!(distinct.len(), 4, "{got:?}");
    assert!(
        got.iter()
            .all(|c| cluster.contains(c.addr()) && c.len() == 24)
    );
    // Asking again gives the same one; a fifth node finds none free.
    assert_eq!(stores[1].lease_pod_cidr(cluster, 24).await.unwrap(), got[1]);
    let e = stores[4].lease_pod_cidr(cluster, 24).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "no free /24 pod CIDR in cluster range 10.8.0.0/22"
    );
    // One node leaves: its CIDR goes to the fifth.
    stores[2].close().await.unwrap();
    assert_eq!(stores[4].lease_pod_cidr(cluster, 24).await.unwrap(), got[2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_unreachable_etcd_fails_with_an_error_naming_the_endpoint() {
    let Some(mut etcd) = etcd("etcd unreachable test").await else {
        return;
    };
    // Nothing listens here.
    let dead = format!("http://127.0.0.1:{}", sigil_test_util::free_port());
    let mut cfg = config(&etcd, "node-a", "192.0.2.1");
    cfg.endpoints = vec![dead.clone()];
    let e = KvStore::connect(cfg).await.unwrap_err();
    assert!(
        matches!(e, KvError::Etcd { .. } | KvError::Timeout { .. }),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .starts_with(&format!("etcd lease grant at {dead}")),
        "{e}"
    );

    // Connected, then etcd goes away: calls fail promptly, naming the endpoint.
    let a = node(&etcd, "node-a", "192.0.2.1").await;
    let alloc = ClusterAllocator::new(&a);
    tokio::task::block_in_place(|| etcd.kill());
    let start = Instant::now();
    let e = alloc.allocate(&labels("k8s:app=web")).await.unwrap_err();
    assert!(e.to_string().contains(&etcd.endpoint()), "{e}");
    let e = a.publish_endpoint(
        "10.0.0.1".parse().unwrap(),
        NumericIdentity::new((3 << 16) | 300),
    );
    let e = e.await.unwrap_err();
    assert!(e.to_string().contains(&etcd.endpoint()), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "{:?}",
        start.elapsed()
    );
    assert!(
        alloc.held().await.is_empty(),
        "a failed allocation holds nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_watches_resync_and_leases_survive_an_etcd_restart() {
    let Some(mut etcd) = etcd("etcd restart test").await else {
        return;
    };
    let a = node(&etcd, "node-a", "192.0.2.1").await;
    let b = node(&etcd, "node-b", "192.0.2.2").await;
    let c = node(&etcd, "node-c", "192.0.2.3").await;
    let id = NumericIdentity::new((3 << 16) | 300);
    let ip_a: IpAddr = "10.1.0.1".parse().unwrap();
    let ip_c: IpAddr = "10.3.0.1".parse().unwrap();
    a.publish_endpoint(ip_a, id).await.unwrap();
    c.publish_endpoint(ip_c, id).await.unwrap();
    let mut ipc = b.watch_ipcache();
    let mut map = BTreeMap::new();
    ipcache_until(&mut ipc, &mut map, Duration::from_secs(5), |m| m.len() == 2)
        .await
        .unwrap();
    next_matching(&mut ipc, Duration::from_secs(5), |e| {
        *e == IpCacheEvent::Synced
    })
    .await
    .unwrap();
    let lease_a = a.lease_id();

    // etcd dies; node-c dies while it is down; etcd comes back on the same data directory.
    tokio::task::block_in_place(|| etcd.kill());
    drop(c);
    tokio::task::block_in_place(|| etcd.spawn()).unwrap();

    // b's watch reconnects and resyncs (a second Synced), c's entry expires with its lease,
    // a's lease was kept alive across the restart and a's entry stays.
    let ip_new: IpAddr = "10.1.0.2".parse().unwrap();
    eventually(Duration::from_secs(10), "publish after restart", || async {
        a.publish_endpoint(ip_new, id).await.is_ok()
    })
    .await
    .unwrap();
    let synced = ipcache_until(&mut ipc, &mut map, Duration::from_secs(10), |m| {
        m.contains_key(&ip_new) && !m.contains_key(&ip_c)
    })
    .await
    .unwrap();
    assert!(synced >= 1, "the watch listed again after the restart");
    assert!(map.contains_key(&ip_a), "{map:?}");
    assert_eq!(a.lease_id(), lease_a, "a's lease survived the restart");
    let mut r = raw(&etcd).await;
    assert_eq!(
        r.get("sigil/test/ipcache/10.3.0.1", None)
            .await
            .unwrap()
            .kvs()
            .len(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_a_lost_lease_is_replaced_and_everything_republished() {
    let Some(etcd) = etcd("lease loss test").await else {
        return;
    };
    let a = node(&etcd, "node-a", "192.0.2.1").await;
    let alloc = ClusterAllocator::new(&a);
    let l = labels("k8s:app=web");
    let (id, _) = alloc.allocate(&l).await.unwrap();
    let info = NodeInfo {
        name: "node-a".into(),
        ip: "192.0.2.1".parse().unwrap(),
        pod_cidr_v4: None,
        pod_cidr_v6: None,
        spiffe_id: None,
        carrier_id: None,
    };
    a.publish_node(&info).await.unwrap();
    a.publish_endpoint("10.1.0.1".parse().unwrap(), id)
        .await
        .unwrap();
    let cidr = a
        .lease_pod_cidr("10.9.0.0/16".parse().unwrap(), 24)
        .await
        .unwrap();
    let old = a.lease_id();

    // Someone revokes node-a's lease: every key bound to it disappears at once.
    let mut r = raw(&etcd).await;
    r.lease_revoke(old).await.unwrap();
    let keys = [
        "sigil/test/nodes/node-a".to_owned(),
        "sigil/test/ipcache/10.1.0.1".to_owned(),
        format!("sigil/test/podcidrs/{}-24", cidr.addr()),
    ];
    // The session notices, takes a new lease and writes everything again under it.
    let mut changes = a.lease_changes();
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .unwrap()
        .unwrap();
    let new = a.lease_id();
    assert_ne!(new, old);
    for k in &keys {
        let got = r.get(k.as_str(), None).await.unwrap();
        let kv = got
            .kvs()
            .first()
            .with_context(|| format!("{k} missing"))
            .unwrap();
        assert_eq!(kv.lease(), new, "{k}");
    }
    let refs = r
        .get(
            "sigil/test/identities/value/",
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(refs.kvs().len(), 1);
    assert_eq!(refs.kvs()[0].lease(), new);
    assert_eq!(refs.kvs()[0].value_str().unwrap(), id.get().to_string());
    // GC does not take the identity: it is referenced again.
    assert_eq!(alloc.gc(Duration::ZERO).await.unwrap().marked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_forged_ipcache_and_identity_entries_are_ignored() {
    let Some(etcd) = etcd("forged entries test").await else {
        return;
    };
    let b = node(&etcd, "node-b", "192.0.2.2").await;
    let alloc = ClusterAllocator::new(&b);
    alloc.wait_synced().await;
    let mut ipc = b.watch_ipcache();
    let mut r = raw(&etcd).await;
    let put = |k: &str, v: &str| (format!("sigil/test/{k}"), v.to_owned());
    // A writer with etcd access claims the host identity, a node-local CIDR identity and
    // malformed entries for IPs; and forges identities outside the cluster's range or with
    // non-canonical labels.
    let forged = [
        put(
            "ipcache/10.0.0.1",
            r#"{"identity":1,"host_ip":"192.0.2.9","node":"evil"}"#,
        ),
        put(
            "ipcache/10.0.0.2",
            r#"{"identity":16777517,"host_ip":"192.0.2.9","node":"evil"}"#,
        ),
        put(
            "ipcache/10.0.0.3",
            r#"{"identity":196908,"host_ip":"0.0.0.0","node":"evil"}"#,
        ),
        put(
            "ipcache/10.0.0.4",
            r#"{"identity":196908,"host_ip":"192.0.2.9","node":"evil","x":1}"#,
        ),
        put(
            "ipcache/not-an-ip",
            r#"{"identity":196908,"host_ip":"192.0.2.9","node":"evil"}"#,
        ),
        put("ipcache/10.0.0.5", "garbage"),
        put("identities/id/70000", "k8s:app=evil"),
        put("identities/id/196909", "k8s:b=1;k8s:a=2"),
        put("identities/id/196910", "reserved:host"),
    ];
    for (k, v) in &forged {
        r.put(k.as_str(), v.as_str(), None).await.unwrap();
    }
    // Control: a well-formed entry of another node and a well-formed identity do arrive.
    r.put(
        "sigil/test/ipcache/10.0.0.9",
        r#"{"identity":196908,"host_ip":"192.0.2.9","node":"node-c"}"#,
        None,
    )
    .await
    .unwrap();
    r.put("sigil/test/identities/id/196908", "k8s:app=ok", None)
        .await
        .unwrap();
    let mut map = BTreeMap::new();
    ipcache_until(&mut ipc, &mut map, Duration::from_secs(5), |m| {
        m.contains_key(&"10.0.0.9".parse().unwrap())
    })
    .await
    .unwrap();
    assert_eq!(map.len(), 1, "forged entries got through: {map:?}");
    eventually(
        Duration::from_secs(5),
        "control identity cached",
        || async { alloc.lookup(NumericIdentity::new(196908)).is_some() },
    )
    .await
    .unwrap();
    let ids: Vec<u32> = alloc.list().iter().map(|(id, _)| id.get()).collect();
    assert_eq!(ids, vec![196908], "forged identities cached");
    // Overwriting the valid entry with a forged one removes it rather than keeping stale data.
    r.put(
        "sigil/test/ipcache/10.0.0.9",
        r#"{"identity":1,"host_ip":"192.0.2.9","node":"node-c"}"#,
        None,
    )
    .await
    .unwrap();
    ipcache_until(&mut ipc, &mut map, Duration::from_secs(5), |m| m.is_empty())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_gc_racing_allocations_never_deletes_a_referenced_identity() {
    let Some(etcd) = etcd("identity GC race stress test").await else {
        return;
    };
    // node-a collects garbage with no grace in a loop while node-b allocates and releases the
    // same label set: after every allocation the number must still exist with these labels
    // (GC's delete re-checks for references inside its transaction).
    let a = Arc::new(ClusterAllocator::new(
        &node(&etcd, "node-a", "192.0.2.1").await,
    ));
    let b = ClusterAllocator::new(&node(&etcd, "node-b", "192.0.2.2").await);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc = {
        let (a, stop) = (Arc::clone(&a), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut deleted = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                deleted += a.gc(Duration::ZERO).await.unwrap().deleted;
            }
            deleted
        })
    };
    let l = labels("k8s:app=churn");
    let mut r = raw(&etcd).await;
    let mut missing = 0;
    for _ in 0..150 {
        let (id, _) = b.allocate(&l).await.unwrap();
        // Let GC passes run while the reference is held.
        for _ in 0..2 {
            let got = r
                .get(format!("sigil/test/identities/id/{}", id.get()), None)
                .await
                .unwrap();
            if got.kvs().first().map(|kv| kv.value()) != Some(l.sorted_string().as_bytes()) {
                missing += 1;
            }
        }
        b.release(id).await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let deleted = gc.await.unwrap();
    assert_eq!(missing, 0, "referenced identity deleted {missing} times");
    assert!(
        deleted > 0,
        "GC never ran a delete: the race was not exercised"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_a_number_reused_while_a_lease_was_lost_is_not_handed_out_for_the_old_labels() {
    let Some(etcd) = etcd("identity reuse after lease loss test").await else {
        return;
    };
    // One number in the range. node-a holds it for L; its lease is revoked; before node-a
    // notices (keep-alive every 2 s), node-b collects the number and takes it for L'. node-a
    // must then not keep handing the number out for L, nor re-reference it.
    let mut cfg = config(&etcd, "node-a", "192.0.2.1");
    cfg.lease_ttl = Duration::from_secs(6);
    let a_store = KvStore::connect(cfg).await.unwrap();
    let a = ClusterAllocator::with_range(&a_store, 256, 256).unwrap();
    let b =
        ClusterAllocator::with_range(&node(&etcd, "node-b", "192.0.2.2").await, 256, 256).unwrap();
    let (l, l2) = (labels("k8s:app=old"), labels("k8s:app=new"));
    let (n, _) = a.allocate(&l).await.unwrap();
    let mut r = raw(&etcd).await;
    let mut taken = false;
    for _ in 0..3 {
        let mut changes = a_store.lease_changes();
        r.lease_revoke(a_store.lease_id()).await.unwrap();
        b.gc(Duration::ZERO).await.unwrap();
        if b.gc(Duration::ZERO).await.unwrap().deleted == 1 {
            assert_eq!(b.allocate(&l2).await.unwrap().0, n);
            taken = true;
        }
        tokio::time::timeout(Duration::from_secs(10), changes.changed())
            .await
            .unwrap()
            .unwrap();
        if taken {
            break;
        }
    }
    assert!(
        taken,
        "node-a republished before node-b could collect (3 times)"
    );
    // node-a's republish found the number taken and dropped its reference.
    let refs = r
        .get(
            "sigil/test/identities/value/",
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let holders: Vec<_> = refs
        .kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_owned())
        .collect();
    assert!(
        holders.iter().all(|k| k.ends_with("/node-b")),
        "{holders:?}"
    );
    eventually(
        Duration::from_secs(5),
        "node-a's cache sees the reuse",
        || async { a.lookup(n) == Some(l2.clone()) },
    )
    .await
    .unwrap();
    // Allocating L again must not return n (now L'): the range is full, so it fails.
    let e = a.allocate(&l).await.unwrap_err();
    assert!(matches!(e, KvError::Exhausted { .. }), "{e}");
    let stored = etcd_identities(&mut r).await.unwrap();
    assert_eq!(stored.get(&n.get()), Some(&l2.sorted_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_gc_loop_collects_unused_identities_and_keeps_used_ones() {
    let Some(etcd) = etcd("identity GC loop test").await else {
        return;
    };
    let a = Arc::new(ClusterAllocator::new(
        &node(&etcd, "node-a", "192.0.2.1").await,
    ));
    let (used, _) = a.allocate(&labels("k8s:app=used")).await.unwrap();
    let (unused, _) = a.allocate(&labels("k8s:app=unused")).await.unwrap();
    a.release(unused).await.unwrap();
    let gc = {
        let a = Arc::clone(&a);
        tokio::spawn(async move {
            a.gc_loop(Duration::from_millis(50), Duration::from_millis(200))
                .await;
        })
    };
    let mut r = raw(&etcd).await;
    eventually(
        Duration::from_secs(5),
        "the unused identity is collected",
        || {
            let mut r = r.clone();
            async move {
                let ids = etcd_identities(&mut r).await.unwrap();
                !ids.contains_key(&unused.get())
            }
        },
    )
    .await
    .unwrap();
    gc.abort();
    let ids = etcd_identities(&mut r).await.unwrap();
    assert_eq!(ids.keys().copied().collect::<Vec<_>>(), vec![used.get()]);
}
