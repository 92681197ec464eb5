//! The policy engine against the targets of issue 4, each beside a baseline measured in the
//! same run: a linear first-match rule list, the way IP-rule firewalls work (iptables rules
//! matching ipsets of source and destination identities, a port range and a protocol, the
//! first match deciding, denies placed first so that deny wins).
//!
//! - `lookup`: one flow's verdict with 10, 1 000 and 100 000 identities and 10 and 1 000
//!   policies (target < 100 ns, flat). 100 000 identities exceed one cluster's 65 280 label
//!   numbers, so they are 80 000 label identities over cluster IDs 1 and 2 plus 20 000 CIDR
//!   identities (one in five everywhere).
//! - `compile`: 10 000 label identities (+ 2 000 CIDR identities) × 1 000 policies from
//!   nothing (target < 1 s); the baseline builds the linear list with every selector
//!   evaluated against every identity.
//! - `update`: adding or removing one identity in that compiled state (target < 1 ms); the
//!   baseline adds it to every ipset whose selector matches it.
//!
//! `cargo bench -p sigil-policy --bench engine` (`-- lookup` etc. for one group).

#[path = "support/linear.rs"]
mod linear;
#[path = "support/synthetic.rs"]
mod synthetic;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use linear::{Linear, cache_sets};
use sigil_identity::NumericIdentity;
use sigil_labels::Labels;
use sigil_policy::{EnforcementMode, PolicyEngine};
use synthetic::{World, label_id, label_labels};

fn compiled(world: &World) -> PolicyEngine {
    let mut e = PolicyEngine::new(EnforcementMode::Default);
    e.add_identities(world.all_identities());
    e.upsert_policies(world.docs.iter().cloned());
    e
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup");
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    for (n, rules) in [
        (10u32, 10u32),
        (10, 1_000),
        (1_000, 10),
        (1_000, 1_000),
        (100_000, 10),
        (100_000, 1_000),
    ] {
        let cidrs = n / 5;
        let world = World::new(n - cidrs, cidrs, rules);
        let t = Instant::now();
        let e = compiled(&world);
        let took = t.elapsed();
        let lin = Linear::build(&world.docs, &world.all_identities(), Some(&cache_sets(&e)));
        let flows = world.flows(4096);
        let mask = flows.len() - 1;
        // Both must do the same job: count where their verdicts agree.
        let (mut allowed, mut agree) = (0, 0);
        for &(ep, d, r, p, port) in &flows {
            let a = e.lookup(ep, d, r, p, port).is_some_and(|v| v.allowed);
            allowed += usize::from(a);
            agree += usize::from(a == lin.check(ep.get(), d, r.get(), p, port));
        }
        eprintln!(
            "lookup setup ids={n} rules={rules}: compiled in {:.2} s, {} distinct maps, \
             {} linear rules, {} ipsets; {} flows, {allowed} allowed, verdicts agree on {agree}",
            took.as_secs_f64(),
            e.distinct_maps(),
            lin.rules.len(),
            lin.sets.len(),
            flows.len(),
        );
        let id = format!("ids={n}/rules={rules}");
        g.bench_function(BenchmarkId::new("engine", &id), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) & mask;
                let (ep, d, r, p, port) = flows[i];
                black_box(e.lookup(black_box(ep), d, r, p, port))
            })
        });
        g.bench_function(BenchmarkId::new("linear_first_match", &id), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) & mask;
                let (ep, d, r, p, port) = flows[i];
                black_box(lin.check(black_box(ep.get()), d, r.get(), p, port))
            })
        });
    }
    g.finish();
}

/// 10 000 label identities (+ 2 000 CIDR identities) × 1 000 policies.
fn big_world() -> World {
    World::new(10_000, 2_000, 1_000)
}

fn compile(c: &mut Criterion) {
    let world = big_world();
    let ids = world.all_identities();
    let yaml = synthetic::policy_yaml(world.rules, world.apps);
    let mut g = c.benchmark_group("compile");
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(8));
    g.bench_function("parse_1000_policies_yaml", |b| {
        b.iter(|| sigil_policy::parse_documents(black_box(&yaml), "bench"))
    });
    g.bench_function("engine_identities_then_policies", |b| {
        b.iter_batched(
            || (ids.clone(), world.docs.clone()),
            |(ids, docs)| {
                let mut e = PolicyEngine::new(EnforcementMode::Default);
                e.add_identities(ids);
                e.upsert_policies(docs);
                e
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("engine_policies_then_identities", |b| {
        b.iter_batched(
            || (ids.clone(), world.docs.clone()),
            |(ids, docs)| {
                let mut e = PolicyEngine::new(EnforcementMode::Default);
                e.upsert_policies(docs);
                e.add_identities(ids);
                e
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("linear_first_match_build", |b| {
        b.iter(|| Linear::build(black_box(&world.docs), &ids, None))
    });
    g.finish();
}

fn update(c: &mut Criterion) {
    let world = big_world();
    let mut e = compiled(&world);
    let mut lin = Linear::build(&world.docs, &world.all_identities(), Some(&cache_sets(&e)));
    // New pods of existing apps (a new revision each), cycling over the apps.
    let fresh: Vec<(NumericIdentity, Labels)> = (0..64)
        .map(|k| {
            let j = world.label_count + k * 7;
            (label_id(j), label_labels(j, world.apps))
        })
        .collect();
    let d = e.add_identity(fresh[0].0, fresh[0].1.clone());
    eprintln!(
        "update setup: one added identity changes {} keys in {} endpoints' maps ({} distinct maps)",
        d.total_changes(),
        d.endpoints.len(),
        e.distinct_maps()
    );
    e.remove_identity(fresh[0].0);

    let mut g = c.benchmark_group("update");
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("engine_add_identity", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for k in 0..iters {
                let (id, labels) = fresh[(k % 64) as usize].clone();
                let t = Instant::now();
                black_box(e.add_identity(id, labels));
                total += t.elapsed();
                e.remove_identity(id);
            }
            total
        })
    });
    g.bench_function("engine_remove_identity", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for k in 0..iters {
                let (id, labels) = fresh[(k % 64) as usize].clone();
                e.add_identity(id, labels);
                let t = Instant::now();
                black_box(e.remove_identity(id));
                total += t.elapsed();
            }
            total
        })
    });
    g.bench_function("linear_first_match_add_identity", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for k in 0..iters {
                let (id, labels) = &fresh[(k % 64) as usize];
                let t = Instant::now();
                lin.add_identity(id.get(), labels);
                total += t.elapsed();
                lin.remove_identity(id.get());
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, lookup, compile, update);
criterion_main!(benches);
