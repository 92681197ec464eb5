//! Timing probe for the targets (the criterion benches live elsewhere): full compile of
//! 10 000 identities x 1 000 rules, adding one identity, and lookups that stay flat as
//! identities grow. Run with `cargo test --release -p sigil-policy --test perf -- --ignored
//! --nocapture`; the bounds are asserted only in optimized builds.
#![allow(clippy::unwrap_used)]

#[path = "support/helpers.rs"]
mod helpers;

use std::time::Instant;

use helpers::*;
use sigil_labels::Labels;
use sigil_policy::{Direction, Document, EnforcementMode, PolicyEngine};

const SERVICES: usize = 500;

fn identities(n: usize) -> Vec<(u32, Labels)> {
    (0..n)
        .map(|j| {
            let l = labels(&format!(
                "k8s:app=svc{},k8s:io.kubernetes.pod.namespace=prod,k8s:pod-template-hash=h{j}",
                j % SERVICES
            ));
            (256 + j as u32, l)
        })
        .collect()
}

fn rules(n: usize) -> Vec<Document> {
    let mut y = String::new();
    for i in 0..n {
        y.push_str(&format!(
            "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: r{i}, namespace: prod}}\nspec:\n  endpointSelector: {{matchLabels: {{app: svc{}}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: svc{}}}}}]\n    toPorts: [{{ports: [{{port: '{}', protocol: TCP}}]}}]\n  egress:\n  - toEndpoints: [{{matchLabels: {{app: svc{}}}}}]\n",
            i % SERVICES,
            (i * 7 + 1) % SERVICES,
            8000 + i % 100,
            (i * 3 + 2) % SERVICES,
        ));
    }
    docs(&y)
}

fn check(what: &str, took: std::time::Duration, bound_ms: f64) {
    let ms = took.as_secs_f64() * 1e3;
    println!("{what}: {ms:.3} ms (target < {bound_ms} ms)");
    if !cfg!(debug_assertions) {
        assert!(ms < bound_ms, "{what} took {ms:.3} ms");
    }
}

#[test]
#[ignore = "timing probe: run with --release -- --ignored"]
fn compile_and_lookup_targets() {
    let ids = identities(10_000);
    let t = Instant::now();
    let docs = rules(1_000);
    println!(
        "parse 1000 policies: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    let t = Instant::now();
    let mut e = PolicyEngine::new(EnforcementMode::Default);
    e.add_identities(ids.iter().map(|(i, l)| (id(*i), l.clone())));
    let d = e.upsert_policies(docs.iter().cloned());
    check(
        "full compile, identities then policies",
        t.elapsed(),
        1000.0,
    );
    println!(
        "  {} delta keys, {} distinct maps",
        d.total_changes(),
        e.distinct_maps()
    );

    let t = Instant::now();
    let mut e2 = PolicyEngine::new(EnforcementMode::Default);
    e2.upsert_policies(docs.iter().cloned());
    e2.add_identities(ids.iter().map(|(i, l)| (id(*i), l.clone())));
    check(
        "full compile, policies then identities",
        t.elapsed(),
        1000.0,
    );
    assert_eq!(e.policy_map(id(300)), e2.policy_map(id(300)));

    let t = Instant::now();
    let d = e.add_identity(
        id(20_000),
        labels("k8s:app=svc7,k8s:io.kubernetes.pod.namespace=prod,k8s:pod-template-hash=new"),
    );
    check("add one identity", t.elapsed(), 1.0);
    println!("  {} endpoints updated", d.endpoints.len());
    let t = Instant::now();
    e.remove_identity(id(20_000));
    check("remove one identity", t.elapsed(), 1.0);

    for n in [10usize, 1_000, 100_000] {
        let ids = identities(n);
        let docs = rules(if n < 1000 { 10 } else { 1000 });
        let mut e = PolicyEngine::new(EnforcementMode::Default);
        e.add_identities(ids.iter().map(|(i, l)| (id(*i), l.clone())));
        e.upsert_policies(docs);
        let flows: Vec<(u32, u32, u16)> = (0..4096u32)
            .map(|k| {
                let j = k.wrapping_mul(2654435761) % n as u32;
                let s = j % SERVICES as u32;
                if k % 2 == 0 {
                    // A flow rule `s` allows: from svc(7s+1) on port 8000 + s % 100.
                    let peer_svc = (7 * s + 1) % SERVICES as u32;
                    let copies = (n as u32)
                        .saturating_sub(peer_svc)
                        .div_ceil(SERVICES as u32)
                        .max(1);
                    let b = peer_svc + SERVICES as u32 * (k % copies);
                    (256 + j, 256 + b.min(n as u32 - 1), 8000 + (s % 100) as u16)
                } else {
                    let b = k.wrapping_mul(40503) % n as u32;
                    (256 + j, 256 + b, 8000 + (k % 120) as u16)
                }
            })
            .collect();
        let rounds = 200;
        let t = Instant::now();
        let mut allowed = 0u32;
        for _ in 0..rounds {
            for &(a, b, port) in &flows {
                if e.lookup(id(a), Direction::Ingress, id(b), TCP, port)
                    .unwrap()
                    .allowed
                {
                    allowed += 1;
                }
            }
        }
        let ns = t.elapsed().as_secs_f64() * 1e9 / (rounds * flows.len()) as f64;
        println!("lookup with {n} identities: {ns:.1} ns/flow ({allowed} allowed)");
        if !cfg!(debug_assertions) {
            assert!(ns < 100.0, "lookup {ns} ns");
        }
    }
}
