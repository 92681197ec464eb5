//! The local allocator: stable numbers, reference counts, grace period, ranges, exhaustion and
//! concurrent use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use sigil_identity::{Allocator, Clock, IdentityError, LocalAllocator, NumericIdentity as Id};
use sigil_labels::{Label, Labels, Source};

fn labels(s: &str) -> Labels {
    Labels::parse_list(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn app(n: usize) -> Labels {
    std::iter::once(Label::new(Source::K8s, "app", format!("a{n}"))).collect()
}

/// A clock that only moves when told to.
struct FakeClock {
    offset: Arc<Mutex<Duration>>,
}

impl FakeClock {
    fn new() -> (FakeClock, Clock) {
        let base = Instant::now();
        let offset = Arc::new(Mutex::new(Duration::ZERO));
        let read = Arc::clone(&offset);
        let clock: Clock = Arc::new(move || base + *read.lock().expect("clock lock"));
        (FakeClock { offset }, clock)
    }

    fn advance(&self, d: Duration) {
        *self.offset.lock().expect("clock lock") += d;
    }
}

const GRACE: Duration = Duration::from_secs(60);

#[test]
fn same_labels_same_identity_and_refcount() {
    let a = LocalAllocator::new(0, GRACE);
    let web = labels("k8s:app=web,k8s:io.kubernetes.pod.namespace=default");
    let (id, new) = a.allocate(&web).expect("allocate");
    assert!(new);
    assert_eq!(id, Id::new(256), "first cluster identity");
    // Same set, built in another order: same identity, not new.
    let again = labels("k8s:io.kubernetes.pod.namespace=default,k8s:app=web");
    assert_eq!(a.allocate(&again), Ok((id, false)));
    let (other, new) = a.allocate(&labels("k8s:app=db")).expect("allocate");
    assert!(new);
    assert_ne!(other, id);

    assert_eq!(a.lookup(id), Some(web.clone()));
    assert_eq!(a.lookup_by_labels(&web), Some(id));
    assert_eq!(
        a.list(),
        vec![(id, web.clone()), (other, labels("k8s:app=db"))]
    );
    assert_eq!(a.len(), 2);

    assert_eq!(a.release(id), Ok(false), "one reference left");
    assert_eq!(a.lookup(id), Some(web.clone()));
    assert_eq!(a.release(id), Ok(true), "last reference");
    assert_eq!(a.lookup(id), None);
    assert_eq!(a.lookup_by_labels(&web), None);
    assert_eq!(a.list().len(), 1);
    let err = a.release(id).expect_err("not allocated");
    assert_eq!(err, IdentityError::NotAllocated { id });
    assert!(err.to_string().contains("256"));
    assert_eq!(
        a.release(Id::new(9999)),
        Err(IdentityError::NotAllocated { id: Id::new(9999) })
    );
}

#[test]
fn cluster_id_goes_above_the_local_number() {
    let a = LocalAllocator::new(5, GRACE);
    assert_eq!(a.cluster_id(), 5);
    let (id, _) = a.allocate(&labels("k8s:app=web")).expect("allocate");
    assert_eq!(id.get(), (5 << 16) | 256);
    assert_eq!(id.cluster_id(), 5);
    assert!(!id.is_reserved() && !id.is_cidr());
    assert_eq!(a.lookup(id), Some(labels("k8s:app=web")));
}

#[test]
fn reserved_label_sets_get_reserved_identities() {
    let a = LocalAllocator::new(1, GRACE);
    for (set, want) in [
        ("reserved:host", Id::HOST),
        ("reserved:host,k8s:node=n1", Id::HOST),
        ("reserved:world", Id::WORLD),
        ("reserved:kube-apiserver", Id::KUBE_APISERVER),
        ("reserved:init", Id::INIT),
    ] {
        assert_eq!(a.allocate(&labels(set)), Ok((want, false)), "{set}");
        assert_eq!(a.lookup_by_labels(&labels(set)), Some(want), "{set}");
    }
    assert_eq!(a.release(Id::HOST), Ok(false));
    assert_eq!(a.lookup(Id::HOST), Some(labels("reserved:host")));
    assert!(
        a.list().is_empty(),
        "reserved identities are not allocations"
    );
    // A reserved label among others is an ordinary label set.
    let (id, new) = a
        .allocate(&labels("reserved:world,k8s:app=x"))
        .expect("allocate");
    assert!(new && !id.is_reserved() && !id.is_cidr());
    assert_eq!(a.allocate(&Labels::new()), Err(IdentityError::EmptyLabels));
}

#[test]
fn cidr_label_sets_get_node_local_identities() {
    let a = LocalAllocator::new(3, GRACE)
        .with_cluster_range(256, 256)
        .expect("range");
    let (c1, new) = a.allocate(&labels("cidr:10.0.0.0/8")).expect("allocate");
    assert!(new && c1.is_cidr());
    assert_eq!(c1.get(), Id::LOCAL_CIDR_FLAG | 1);
    assert_eq!(c1.cluster_id(), 0);
    let (c2, _) = a
        .allocate(&labels("cidr:10.0.0.0/8,cidr:10.0.0.0/7,reserved:world"))
        .expect("allocate");
    assert_eq!(c2.get(), Id::LOCAL_CIDR_FLAG | 2);
    // CIDR identities do not use cluster numbers: the one cluster number is still free.
    let (l, _) = a.allocate(&labels("k8s:app=web")).expect("allocate");
    assert_eq!(l.get(), (3 << 16) | 256);
    // A CIDR label mixed with other labels is a label identity: the cluster range is full.
    let err = a
        .allocate(&labels("cidr:10.0.0.0/8,k8s:app=x"))
        .expect_err("exhausted");
    assert!(
        matches!(
            err,
            IdentityError::Exhausted {
                scope: "cluster-local",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        a.lookup(c2),
        Some(labels("cidr:10.0.0.0/8,cidr:10.0.0.0/7,reserved:world"))
    );
}

#[test]
fn grace_period_holds_released_numbers() {
    let (clock, now) = FakeClock::new();
    let a = LocalAllocator::with_clock(0, GRACE, now)
        .with_cluster_range(256, 257)
        .expect("range");
    let (x, y, z) = (
        labels("k8s:app=x"),
        labels("k8s:app=y"),
        labels("k8s:app=z"),
    );

    assert_eq!(a.allocate(&x), Ok((Id::new(256), true)));
    assert_eq!(a.release(Id::new(256)), Ok(true));
    assert_eq!(
        a.allocate(&y),
        Ok((Id::new(257), true)),
        "fresh numbers before reuse"
    );
    // 256 is in its grace period: z cannot have it.
    let err = a.allocate(&z).expect_err("exhausted during grace");
    match &err {
        IdentityError::Exhausted {
            scope,
            range,
            labels,
        } => {
            assert_eq!(*scope, "cluster-local");
            assert!(range.contains("256..=257"), "{range}");
            assert_eq!(labels, "k8s:app=z");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("k8s:app=z"));

    // x comes back within the grace period: same number, newly allocated again.
    clock.advance(GRACE / 2);
    assert_eq!(a.allocate(&x), Ok((Id::new(256), true)));
    assert_eq!(a.lookup(Id::new(256)), Some(x.clone()));

    // Released again at t=30s; the first release (t=0) must not free it at t=60s.
    assert_eq!(a.release(Id::new(256)), Ok(true));
    clock.advance(GRACE / 2 + Duration::from_secs(1));
    assert!(
        a.allocate(&z).is_err(),
        "grace counts from the latest release"
    );
    clock.advance(GRACE / 2);
    assert_eq!(
        a.allocate(&z),
        Ok((Id::new(256), true)),
        "grace over: number reused"
    );
    assert_eq!(a.lookup(Id::new(256)), Some(z.clone()));
    assert_eq!(a.lookup_by_labels(&x), None);
    // x lost its number and the pool is full.
    assert!(a.allocate(&x).is_err());
}

#[test]
fn zero_grace_reuses_after_fresh_numbers_run_out() {
    let (_clock, now) = FakeClock::new();
    let a = LocalAllocator::with_clock(0, Duration::ZERO, now)
        .with_cluster_range(256, 257)
        .expect("range");
    assert_eq!(a.allocate(&app(0)), Ok((Id::new(256), true)));
    assert_eq!(a.release(Id::new(256)), Ok(true));
    assert_eq!(a.allocate(&app(1)), Ok((Id::new(257), true)));
    assert_eq!(a.allocate(&app(2)), Ok((Id::new(256), true)));
    assert_eq!(a.lookup(Id::new(256)), Some(app(2)));
}

#[test]
fn cidr_pool_exhaustion() {
    let a = LocalAllocator::new(0, GRACE)
        .with_cidr_range(10, 10)
        .expect("range");
    assert_eq!(
        a.allocate(&labels("cidr:10.0.0.0/8")),
        Ok((Id::new(Id::LOCAL_CIDR_FLAG | 10), true))
    );
    let err = a
        .allocate(&labels("cidr:10.0.0.0/16"))
        .expect_err("exhausted");
    assert!(
        matches!(
            err,
            IdentityError::Exhausted {
                scope: "node-local CIDR",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn invalid_ranges_are_rejected() {
    for (first, last) in [(100, 300), (300, 200), (256, 65_536), (0, 0)] {
        let err = LocalAllocator::new(0, GRACE)
            .with_cluster_range(first, last)
            .expect_err("bad range");
        assert!(
            matches!(err, IdentityError::InvalidRange { first: f, last: l, .. } if f == first && l == last)
        );
        assert!(err.to_string().contains(&format!("{first}..={last}")));
    }
    for (first, last) in [(0, 5), (5, 1 << 24), (9, 8)] {
        assert!(
            LocalAllocator::new(0, GRACE)
                .with_cidr_range(first, last)
                .is_err(),
            "{first}..={last}"
        );
    }
}

#[test]
fn full_cluster_range_then_exhaustion() {
    let a = LocalAllocator::new(0, GRACE);
    let capacity = (Id::MAX_CLUSTER_LOCAL - Id::MIN_CLUSTER_LOCAL + 1) as usize;
    assert_eq!(capacity, 65_280);
    for n in 0..capacity {
        let (id, new) = a.allocate(&app(n)).expect("within capacity");
        assert!(new);
        assert_eq!(id.get(), 256 + n as u32);
    }
    assert!(matches!(
        a.allocate(&app(capacity)),
        Err(IdentityError::Exhausted { .. })
    ));
    // Existing sets still resolve, and CIDR identities are a separate pool: together a node
    // holds over 100 000 identities.
    assert_eq!(a.allocate(&app(0)), Ok((Id::new(256), false)));
    for n in 0..(100_000 - capacity) {
        let cidr = std::iter::once(Label::new(
            Source::Cidr,
            format!("10.{}.{}.0/24", n / 256, n % 256),
            "",
        ))
        .collect::<Labels>();
        let (id, _) = a.allocate(&cidr).expect("cidr identity");
        assert!(id.is_cidr());
    }
    assert_eq!(a.len(), 100_000);
}

#[test]
fn concurrent_allocations_agree() {
    let a: Arc<dyn Allocator> = Arc::new(LocalAllocator::new(2, GRACE));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let a = Arc::clone(&a);
            thread::spawn(move || {
                let mut seen = HashMap::new();
                for n in 0..200 {
                    let (id, _) = a.allocate(&app(n)).expect("shared set");
                    seen.insert(n, id);
                    a.allocate(&app(10_000 + t * 1000 + n)).expect("own set");
                }
                seen
            })
        })
        .collect();
    let results: Vec<HashMap<usize, Id>> = threads
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    for r in &results[1..] {
        assert_eq!(
            r, &results[0],
            "every thread sees the same identity per label set"
        );
    }
    assert_eq!(a.list().len(), 200 + 8 * 200);
    let ids: std::collections::HashSet<_> = a.list().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 200 + 8 * 200, "distinct sets, distinct numbers");

    // Releasing concurrently: exactly one release per shared set reaches zero.
    let shared: Vec<Id> = (0..200).map(|n| results[0][&n]).collect();
    let shared = Arc::new(shared);
    let lasts: usize = (0..8)
        .map(|_| {
            let (a, shared) = (Arc::clone(&a), Arc::clone(&shared));
            thread::spawn(move || {
                shared
                    .iter()
                    .filter(|id| a.release(**id).expect("held"))
                    .count()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .sum();
    assert_eq!(lasts, 200);
    assert_eq!(a.list().len(), 8 * 200);
}
